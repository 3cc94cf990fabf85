#![no_main]
// The body is shared with the test suite's smoke test: one client's whole
// byte stream against the NBD server's handshake and transmission code.
libfuzzer_sys::fuzz_target!(|data: &[u8]| rimg_nbd::fuzz::server(data));
