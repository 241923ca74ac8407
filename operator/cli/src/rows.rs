//! A DispyJobArray's result rows during `dispy run`: each row is appended to a spool file as
//! its job ends, and only its place (index, offset, length) is kept in memory; at the end the
//! rows are written out in index order. Rows are `dispy_core::array` rows, the same JSON lines
//! the operator writes to result ConfigMaps.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use dispy_core::manifest::ArrayResult;

/// Where an array's results go: `dir/NAME.results.jsonl`, or `dir/NAMESPACE/NAME.results.jsonl`
/// outside `default` (as `--files-dir` names sent files).
pub fn results_path(dir: &Path, namespace: &str, array: &str) -> PathBuf {
    let file = format!("{array}.results.jsonl");
    if namespace == "default" {
        dir.join(file)
    } else {
        dir.join(namespace).join(file)
    }
}

/// Rows of one array, spooled.
pub struct RowSpool {
    path: PathBuf,
    file: BufWriter<File>,
    /// (index, offset, length) of each row in the spool, in the order they came.
    places: Vec<(u32, u64, u32)>,
    size: u64,
    /// The first write that failed; the run goes on and the error is reported at the end.
    error: Option<String>,
}

impl RowSpool {
    /// A new, empty spool file at `path` (its directory is created).
    pub fn create(path: PathBuf) -> Result<RowSpool, String> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        // Read back at the end, at each row's offset.
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        Ok(RowSpool {
            path,
            file: BufWriter::new(file),
            places: Vec::new(),
            size: 0,
            error: None,
        })
    }

    pub fn push(&mut self, row: &ArrayResult) {
        let line = dispy_core::array::line(row);
        match self.file.write_all(line.as_bytes()) {
            Ok(()) => {
                self.places.push((row.index, self.size, line.len() as u32));
                self.size += line.len() as u64;
            }
            Err(e) if self.error.is_none() => {
                self.error = Some(format!("cannot write {}: {e}", self.path.display()))
            }
            Err(_) => {}
        }
    }

    /// Writes every index's row (the last pushed for it) to `out` in index order and removes
    /// the spool file.
    pub fn finish(mut self, out: &mut impl Write) -> Result<(), String> {
        let spooled = self.file.flush().map_err(|e| e.to_string()).and_then(|()| {
            self.error.take().map_or(Ok(()), Err)?;
            let file = self.file.get_ref();
            // Stable: of two rows of one index, the later stays last.
            self.places.sort_by_key(|p| p.0);
            let mut buf = Vec::new();
            for (n, &(index, offset, len)) in self.places.iter().enumerate() {
                if self.places.get(n + 1).is_some_and(|next| next.0 == index) {
                    continue;
                }
                buf.resize(len as usize, 0);
                file.read_exact_at(&mut buf, offset)
                    .and_then(|()| out.write_all(&buf))
                    .map_err(|e| e.to_string())?;
            }
            out.flush().map_err(|e| e.to_string())
        });
        let _ = std::fs::remove_file(&self.path);
        spooled.map_err(|e| format!("writing results from {}: {e}", self.path.display()))
    }

    /// Writes the rows in index order to the file `path`.
    pub fn finish_to(self, path: &Path) -> Result<(), String> {
        let file =
            File::create(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        self.finish(&mut BufWriter::new(file))
    }
}

/// The spool beside an array's results file: its rows as they came, while the run goes on.
pub fn spool_path(results: &Path) -> PathBuf {
    PathBuf::from(format!("{}.partial", results.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use dispy_core::job::JobStatus;

    fn row(index: u32, status: JobStatus) -> ArrayResult {
        ArrayResult {
            index,
            status,
            result: Some(serde_json::json!(index * 10)),
            ..Default::default()
        }
    }

    #[test]
    fn rows_come_out_in_index_order_the_last_of_an_index_winning() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = RowSpool::create(dir.path().join("a/s.spool")).unwrap();
        for i in [3, 0, 2, 1] {
            spool.push(&row(i, JobStatus::Finished));
        }
        spool.push(&row(2, JobStatus::Terminated));
        let mut out = Vec::new();
        spool.finish(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let rows: Vec<ArrayResult> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            rows.iter().map(|r| r.index).collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
        assert_eq!(rows[2].status, JobStatus::Terminated);
        assert_eq!(
            text.lines().next().unwrap(),
            dispy_core::array::line(&row(0, JobStatus::Finished)).trim_end()
        );
        assert!(
            !dir.path().join("a/s.spool").exists(),
            "the spool is removed"
        );
    }

    #[test]
    fn results_files_are_named_like_sent_files_directories() {
        let dir = Path::new("out");
        assert_eq!(
            results_path(dir, "default", "sq"),
            Path::new("out/sq.results.jsonl")
        );
        assert_eq!(
            results_path(dir, "team", "sq"),
            Path::new("out/team/sq.results.jsonl")
        );
        let tmp = tempfile::tempdir().unwrap();
        let path = results_path(tmp.path(), "team", "sq");
        let mut spool = RowSpool::create(spool_path(&path)).unwrap();
        spool.push(&row(1, JobStatus::Finished));
        spool.push(&row(0, JobStatus::Abandoned));
        spool.finish_to(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with("{\"index\":0,\"status\":\"Abandoned\""),
            "{text}"
        );
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
    }
}
