//! Packet-level tests of the datapath through `BPF_PROG_TEST_RUN`: frames built and judged in userspace
//! ([`frame`]), the real object loaded and programmed in a private namespace ([`rig`]), and the fuzzer
//! whose invariants every run must keep ([`fuzz`]).

pub mod frame;
pub mod fuzz;
pub mod rig;
