//! Benchmarks on built-in models of chosen sizes (weights generated in process): each memory
//! plan's measured peak and time beside the planner's prediction (`plans`), and each storage
//! type's error and speed (`quant`), and what a CUDA build does on the GPU it runs on
//! (`device_check`). They return their tables as Markdown for a front end to
//! print; progress goes to standard error.

/// `writeln!` into a `String`, which cannot fail.
macro_rules! outln {
    ($out:expr) => {
        $out.push('\n')
    };
    ($out:expr, $($arg:tt)*) => {{
        use std::fmt::Write as _;
        let _ = writeln!($out, $($arg)*);
    }};
}

pub mod cpu;
pub mod device_check;
pub mod plans;
pub mod quant;
