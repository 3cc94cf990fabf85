#![no_main]
// The body is shared with the test suite's smoke test.
libfuzzer_sys::fuzz_target!(|data: &[u8]| qcow2::fuzz_targets::vhdx(data));
