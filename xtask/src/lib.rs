//! The library half of xtask: the benchmark (`cargo xtask bench`), a library so that its smoke test
//! (`tests/bench_smoke.rs`) calls the same code. The other commands live in the binary (`main.rs`).

pub mod bench;
