#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 60 s each) with cargo-fuzz (libFuzzer,
# nightly toolchain), from the committed seeds in fuzz/corpus/<target>/; what it learns goes to
# fuzz/corpus-work/<target>/ (not committed). A crash leaves its input in
# fuzz/artifacts/<target>/: copy it into fuzz/corpus/<target>/ once fixed, so that
# `cargo test -p fluxfit --test engine fuzz_corpus` keeps checking it on stable.
#
#   tools/fuzz.sh [SECONDS] [TARGET...]
#
# Needs `rustup toolchain install nightly` and `cargo install cargo-fuzz` (both from the
# package registries); CI does not run it.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(safetensors gguf shard_index t5_tokenizer clip_bpe tokenize lora_keys specs image)
fi
status=0
for t in "${targets[@]}"; do
    echo "== $t (${secs}s)"
    # -rss_limit_mb: a target that allocates past it is a finding (an unbounded allocation).
    mkdir -p "fuzz/corpus-work/$t"
    if ! (cd fuzz && cargo +nightly fuzz run "$t" "corpus-work/$t" "corpus/$t" -- \
            -max_total_time="$secs" -rss_limit_mb=2048 -max_len=65536 -timeout=10); then
        echo "!! $t found a crash: see fuzz/artifacts/$t/"
        status=1
    fi
done
exit $status
