//! The library half of xtask. `cmd` and `setup` are shared by both binaries: `xtask` (setup, test,
//! build-ebpf; it must build before anything is installed) and `xtask-lab` (demo, fuzz, bench; built
//! with the `lab` feature because it links the agent, whose build script needs what setup installs).
//! The benchmark is here so that its smoke test (`tests/bench_smoke.rs`) calls the same code.

pub mod cmd;
pub mod setup;

#[cfg(feature = "lab")]
pub mod bench;
#[cfg(feature = "lab")]
pub mod demo;
#[cfg(feature = "lab")]
pub mod fuzz;
