//! Standard output that fails with an error, not a panic: `println!` panics when stdout is a
//! closed pipe or a full disk (`fluxfit plan | head -1`, `> /dev/full`).

/// `println!` that returns `anyhow::Result<()>`.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
            .map_err(|e| anyhow::anyhow!("cannot write to standard output: {e}"))
    }};
}

/// `print!` that returns `anyhow::Result<()>` (and flushes).
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut o = std::io::stdout().lock();
        write!(o, $($arg)*)
            .and_then(|()| o.flush())
            .map_err(|e| anyhow::anyhow!("cannot write to standard output: {e}"))
    }};
}

/// `eprintln!` that never panics: a diagnostic that cannot be written (`2>/dev/full`) has
/// nowhere else to go, so it is dropped rather than turning a clean error into a panic.
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

/// `eprint!` that never panics (and flushes), for progress lines.
#[macro_export]
macro_rules! err {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut e = std::io::stderr().lock();
        let _ = write!(e, $($arg)*).and_then(|()| e.flush());
    }};
}
