//! Linux `/proc` files read as data: the parsers take the file's text and return fields, so
//! they are tested without processes. Fields are numbered as in proc(5).

/// Field `n` (1-based, as in proc(5)) of a `/proc/<pid>/stat` line. The command name (field
/// 2) is whatever the process chose, spaces and parentheses included, so the fields after it
/// are found after its last `)`.
pub fn stat_field(stat: &str, n: usize) -> Option<&str> {
    match n {
        0 => None,
        1 => stat.split_whitespace().next(),
        2 => {
            let open = stat.find('(')?;
            let close = stat.rfind(')')?;
            stat.get(open + 1..close)
        }
        _ => stat
            .get(stat.rfind(')')? + 1..)?
            .split_whitespace()
            .nth(n - 3),
    }
}

/// The parent pid (field 4) of a `/proc/<pid>/stat` line.
pub fn stat_ppid(stat: &str) -> Option<i32> {
    stat_field(stat, 4)?.parse().ok()
}

/// A `/proc/<pid>/task/<tid>/children` file: pids separated by spaces.
pub fn parse_pids(text: &str) -> Vec<i32> {
    text.split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Reads `/proc/<pid>/stat`; None when the process is gone.
pub fn read_stat(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    // A command name may hold spaces and ")": fields are counted after the last ")".
    const STAT: &str = "4242 (a) b (c)) S 17 4242 4242 0 -1 4194560 98 0 0 0 0 0 0 0 20 0 1 0 \
        123 2162688 176 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0 \
        94000000 94000100 94100000 140730000000 140730000030 140730000030 140730000100 0";

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        assert_eq!(stat_field(STAT, 1), Some("4242"));
        assert_eq!(stat_field(STAT, 2), Some("a) b (c)"));
        assert_eq!(stat_field(STAT, 3), Some("S"));
        assert_eq!(stat_ppid(STAT), Some(17));
        assert_eq!(stat_field(STAT, 48), Some("140730000000"));
        assert_eq!(stat_field(STAT, 49), Some("140730000030"));
        assert_eq!(stat_field(STAT, 53), None);
        assert_eq!(stat_field("", 4), None);
        assert_eq!(stat_ppid("12 (x"), None);
    }

    #[test]
    fn children_files_list_pids() {
        assert_eq!(parse_pids("101 205 7 \n"), vec![101, 205, 7]);
        assert!(parse_pids("").is_empty());
    }
}
