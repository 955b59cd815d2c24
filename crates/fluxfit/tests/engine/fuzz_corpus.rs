//! Every input in the fuzz corpus (`fuzz/corpus/<target>/`, seeds and whatever the fuzzers
//! kept) through its target (`fluxfit::fuzz_targets`), on the stable toolchain: the parsers of
//! untrusted bytes must return, never panic. Inputs that once crashed a target are kept in the
//! corpus, so the fix is checked here on every run.

use std::path::PathBuf;

use fluxfit::fuzz_targets::TARGETS;

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus")
}

#[test]
fn the_fuzz_corpus_passes_every_target() {
    let mut total = 0;
    for (name, target) in TARGETS {
        let dir = corpus().join(name);
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (every target has seeds)", dir.display()));
        let mut n = 0;
        for entry in entries {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| target(&data));
            assert!(outcome.is_ok(), "{name}: {} panics", path.display());
            n += 1;
        }
        assert!(n > 0, "{name}: no seeds in {}", dir.display());
        total += n;
    }
    println!("{total} corpus inputs through {} targets", TARGETS.len());
}
