#![no_main]
// The body is shared with the test suite's smoke test: a server's whole
// byte stream against the engine's NBD client.
libfuzzer_sys::fuzz_target!(|data: &[u8]| qcow2::fuzz_targets::nbd_client(data));
