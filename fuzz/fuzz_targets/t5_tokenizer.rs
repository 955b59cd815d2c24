#![no_main]
//! The tokenizers crate panics on some malformed `tokenizer.json` files; fluxfit catches that
//! panic and reports a bad file. libFuzzer's panic hook aborts on every panic, caught or not,
//! so this target lets panics raised inside the tokenizers crate through to fluxfit's catch;
//! any other panic still aborts and is reported as a crash.
use std::sync::Once;

static HOOK: Once = Once::new();

fn pass_tokenizers_panics() {
    HOOK.call_once(|| {
        let abort_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let inside_tokenizers = info
                .location()
                .is_some_and(|l| l.file().contains("/tokenizers-"));
            if !inside_tokenizers {
                abort_hook(info);
            }
        }));
    });
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    pass_tokenizers_panics();
    fluxfit::fuzz_targets::t5_tokenizer(data)
});
