//! What the node does to itself at start, before any thread or child exists, so that the jobs
//! it runs (user code, as the node's own user) cannot learn its secret or its settings:
//! - every `DISPYNODE_*` variable (`$DISPYNODE_SECRET` and any other setting a deployment put
//!   there) is removed from the node's environment, which everything it starts inherits;
//! - the node is made non-dumpable: a process of the same (non-root) user can then open
//!   neither `/proc/<node>/environ` (the environment the node was started with, which
//!   removing a variable does not change) nor `/proc/<node>/mem`. The price: no core dumps of
//!   the node, and no same-user gdb or strace on it;
//! - the values of those variables are also overwritten with `*` in the memory that
//!   `/proc/<node>/environ` shows, so not even root (whom non-dumpable does not stop) reads
//!   the secret there;
//! - a secret given as `--secret VALUE` or `-s VALUE` is overwritten with `*` in the argument
//!   memory that `/proc/<node>/cmdline`, readable by everyone, shows. Its length still shows,
//!   and so does the secret itself until the node has started: `$DISPYNODE_SECRET` is the way
//!   to pass it.

use std::ops::Range;

use crate::procfs;

/// The prefix of the node's own environment variables.
const PREFIX: &str = "DISPYNODE_";

/// Removes every `DISPYNODE_*` variable from the node's environment. Must run before any
/// thread exists: changing the environment while another thread reads it is undefined.
pub fn scrub_environment() -> Vec<String> {
    let names: Vec<_> = std::env::vars_os()
        .map(|(k, _)| k)
        .filter(|k| k.as_encoded_bytes().starts_with(PREFIX.as_bytes()))
        .collect();
    for name in &names {
        std::env::remove_var(name);
    }
    names
        .iter()
        .map(|n| n.to_string_lossy().into_owned())
        .collect()
}

pub fn make_non_dumpable() -> Result<(), String> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(format!(
            "cannot make the node non-dumpable (jobs may read its /proc/<pid>/environ): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Which options take a value, so that a value (`--name -s`) is not taken for an option.
pub struct OptionSyntax {
    longs: Vec<String>,
    shorts: Vec<char>,
}

impl OptionSyntax {
    pub fn of(command: &clap::Command) -> OptionSyntax {
        let with_value: Vec<_> = command
            .get_arguments()
            .filter(|a| a.get_action().takes_values())
            .collect();
        OptionSyntax {
            longs: with_value
                .iter()
                .filter_map(|a| a.get_long().map(str::to_string))
                .collect(),
            shorts: with_value.iter().filter_map(|a| a.get_short()).collect(),
        }
    }
}

/// Where the values of option `--long`/`-short` are in `argv`: (argument index, byte range),
/// read the way clap reads a command line: `--long V`, `--long=V`, `-s V`, `-sV`, `-s=V`, and
/// `-s` last in a cluster of flags (`-ds V`, `-dsV`); nothing after `--`.
pub fn option_values(
    argv: &[Vec<u8>],
    syntax: &OptionSyntax,
    long: &str,
    short: char,
) -> Vec<(usize, Range<usize>)> {
    let mut found = Vec::new();
    let mut i = 1;
    while i < argv.len() {
        let arg = &argv[i];
        if arg == b"--" {
            break;
        }
        if let Some(rest) = arg.strip_prefix(b"--") {
            let eq = rest.iter().position(|&b| b == b'=');
            let name = &rest[..eq.unwrap_or(rest.len())];
            let takes_value = syntax.longs.iter().any(|l| l.as_bytes() == name);
            match eq {
                Some(eq) if name == long.as_bytes() => found.push((i, 2 + eq + 1..arg.len())),
                None if takes_value => {
                    if name == long.as_bytes() && i + 1 < argv.len() {
                        found.push((i + 1, 0..argv[i + 1].len()));
                    }
                    i += 1;
                }
                _ => {}
            }
        } else if arg.len() > 1 && arg[0] == b'-' {
            // Flags, then at most one option that takes the rest of the cluster or the next
            // argument as its value.
            for (j, &b) in arg.iter().enumerate().skip(1) {
                let c = b as char;
                if !b.is_ascii() || !syntax.shorts.contains(&c) {
                    continue;
                }
                if j + 1 < arg.len() {
                    let start = if arg[j + 1] == b'=' { j + 2 } else { j + 1 };
                    if c == short {
                        found.push((i, start..arg.len()));
                    }
                } else {
                    if c == short && i + 1 < argv.len() {
                        found.push((i + 1, 0..argv[i + 1].len()));
                    }
                    i += 1;
                }
                break;
            }
        }
        i += 1;
    }
    found
}

/// Overwrites with `*` the value of every `DISPYNODE_*` entry in `memory`, an environment
/// block as the kernel laid it out (`NAME=VALUE` entries, each followed by a NUL); returns
/// how many were masked. Bytes after the last NUL are not entries and are left alone.
pub fn mask_environment(memory: &mut [u8]) -> usize {
    let mut masked = 0;
    let mut at = 0;
    while let Some(len) = memory[at..].iter().position(|&b| b == 0) {
        let entry = &mut memory[at..at + len];
        if entry.starts_with(PREFIX.as_bytes()) {
            if let Some(eq) = entry.iter().position(|&b| b == b'=') {
                entry[eq + 1..].fill(b'*');
                masked += 1;
            }
        }
        at += len + 1;
    }
    masked
}

/// Masks the `DISPYNODE_*` values in the environment block `/proc/self/environ` shows. Must
/// run after [`scrub_environment`] (nothing reads those entries any more) and before any
/// thread exists.
pub fn hide_environment_values() -> Result<usize, String> {
    let (start, end) = memory_range(50, 51)?;
    // SAFETY: [env_start, env_end) is where the kernel copied our environment at exec, on the
    // main thread's stack, mapped read-write. The entries masked were removed from `environ`
    // by scrub_environment, so nothing reads them; no other thread exists yet.
    let memory = unsafe { std::slice::from_raw_parts_mut(start as *mut u8, end - start) };
    Ok(mask_environment(memory))
}

/// Two fields of /proc/self/stat that give a range of our own memory.
fn memory_range(from: usize, to: usize) -> Result<(usize, usize), String> {
    let stat = procfs::read_stat(std::process::id() as i32).ok_or("cannot read /proc/self/stat")?;
    let field = |n| {
        procfs::stat_field(&stat, n)
            .and_then(|f| f.parse::<usize>().ok())
            .ok_or(format!("/proc/self/stat has no field {n}"))
    };
    let (start, end) = (field(from)?, field(to)?);
    if start == 0 || end < start {
        return Err(format!(
            "/proc/self/stat gives no memory range ({start}..{end})"
        ));
    }
    Ok((start, end))
}

/// Overwrites `spans` of `argv` with `*` in `memory`, the arguments as the kernel laid them
/// out (each followed by a NUL). Refuses, touching nothing, unless `memory` holds exactly
/// `argv`.
pub fn mask_arguments(
    memory: &mut [u8],
    argv: &[Vec<u8>],
    spans: &[(usize, Range<usize>)],
) -> Result<(), String> {
    let laid_out: Vec<u8> = argv
        .iter()
        .flat_map(|a| a.iter().copied().chain([0]))
        .collect();
    if memory != laid_out.as_slice() {
        return Err("the argument memory does not hold the node's arguments".into());
    }
    let mut offsets = Vec::with_capacity(argv.len());
    let mut at = 0;
    for a in argv {
        offsets.push(at);
        at += a.len() + 1;
    }
    for (i, range) in spans {
        let start = offsets[*i];
        memory[start + range.start..start + range.end].fill(b'*');
    }
    Ok(())
}

/// Overwrites the value of every `--secret`/`-s` on the command line, in the memory that
/// `/proc/self/cmdline` shows; returns how many were hidden. Must run before any thread
/// exists (nothing may read the arguments meanwhile).
pub fn hide_secret_on_command_line(secret: &str) -> Result<usize, String> {
    use clap::CommandFactory;
    if secret.is_empty() {
        return Ok(0);
    }
    let argv: Vec<Vec<u8>> = std::env::args_os()
        .map(|a| a.into_encoded_bytes())
        .collect();
    let syntax = OptionSyntax::of(&crate::config::Args::command());
    let spans = option_values(&argv, &syntax, "secret", 's');
    // Only what clap read as the secret: a misreading of the command line hides nothing else.
    let spans: Vec<_> = spans
        .into_iter()
        .filter(|(i, r)| &argv[*i][r.clone()] == secret.as_bytes())
        .collect();
    if spans.is_empty() {
        return Ok(0);
    }
    let (start, end) = memory_range(48, 49)?;
    // SAFETY: [arg_start, arg_end) is where the kernel copied our arguments at exec, on the
    // main thread's stack, mapped read-write; std only reads it through raw pointers when
    // args() is called, and no other thread exists yet. mask_arguments checks that it holds
    // exactly our arguments before it writes.
    let memory = unsafe { std::slice::from_raw_parts_mut(start as *mut u8, end - start) };
    mask_arguments(memory, &argv, &spans)?;
    Ok(spans.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Args;
    use clap::{CommandFactory, Parser};

    fn argv(args: &[&str]) -> Vec<Vec<u8>> {
        args.iter().map(|a| a.as_bytes().to_vec()).collect()
    }

    fn secrets_found(args: &[&str]) -> Vec<String> {
        let argv = argv(args);
        let syntax = OptionSyntax::of(&Args::command());
        option_values(&argv, &syntax, "secret", 's')
            .into_iter()
            .map(|(i, r)| String::from_utf8(argv[i][r].to_vec()).unwrap())
            .collect()
    }

    #[test]
    fn the_secret_is_found_wherever_clap_reads_it() {
        let lines: &[&[&str]] = &[
            &["dispynode", "--secret", "k1", "--cpus", "2"],
            &["dispynode", "--cpus", "2", "--secret=k1"],
            &["dispynode", "-s", "k1"],
            &["dispynode", "-sk1"],
            &["dispynode", "-s=k1"],
            &["dispynode", "-d", "-s", "k1", "--daemon"],
            &["dispynode", "-ds", "k1"],
            &["dispynode", "-dsk1"],
            &["dispynode", "--cpus", "-1", "-s", "k1"],
        ];
        for line in lines {
            let parsed = Args::try_parse_from(*line).unwrap();
            assert_eq!(parsed.secret, "k1", "{line:?}");
            assert_eq!(secrets_found(line), vec!["k1"], "{line:?}");
        }
    }

    #[test]
    fn values_of_other_options_are_not_taken_for_the_secret() {
        let lines: &[&[&str]] = &[
            &["dispynode", "--name=-sx"],
            &["dispynode", "--name=--secret=x"],
            &["dispynode", "-i", "127.0.0.1", "--python", "s"],
            &["dispynode", "-c2", "-p", "9701", "--name", "s"],
        ];
        for line in lines {
            assert_eq!(Args::try_parse_from(*line).unwrap().secret, "", "{line:?}");
            assert!(secrets_found(line).is_empty(), "{line:?}");
        }
    }

    #[test]
    fn masking_overwrites_only_the_value_and_keeps_the_layout() {
        let args = argv(&["dispynode", "--secret", "k1", "--secret=abc"]);
        let mut memory = b"dispynode\0--secret\0k1\0--secret=abc\0".to_vec();
        let spans = vec![(2, 0..2), (3, 9..12)];
        mask_arguments(&mut memory, &args, &spans).unwrap();
        assert_eq!(memory, b"dispynode\0--secret\0**\0--secret=***\0");
    }

    #[test]
    fn environment_masking_overwrites_only_dispynode_values() {
        let mut env = b"PATH=/bin\0DISPYNODE_SECRET=s3cret\0HOME=/root\0DISPYNODE_X=\0NOT_DISPYNODE_Y=1\0tail".to_vec();
        assert_eq!(mask_environment(&mut env), 2);
        assert_eq!(
            env,
            b"PATH=/bin\0DISPYNODE_SECRET=******\0HOME=/root\0DISPYNODE_X=\0NOT_DISPYNODE_Y=1\0tail"
        );
    }

    #[test]
    fn masking_refuses_memory_that_is_not_the_arguments() {
        let args = argv(&["dispynode", "-s", "k1"]);
        let mut memory = b"dispynode\0-s\0k2\0".to_vec();
        let err = mask_arguments(&mut memory, &args, &[(2, 0..2)]).unwrap_err();
        assert!(err.contains("does not hold"), "{err}");
        assert_eq!(memory, b"dispynode\0-s\0k2\0");
    }
}
