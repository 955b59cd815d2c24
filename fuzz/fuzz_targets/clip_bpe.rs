#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| fluxfit::fuzz_targets::clip_bpe(data));
