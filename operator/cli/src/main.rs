//! `dispy`: run JobCluster, DispyJob and DispyJobArray manifests without Kubernetes, and read
//! a DispyJobArray's results from a cluster.

mod load;
mod output;
mod progress;
mod results;
mod rows;
mod run;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "dispy",
    version,
    about = "Run dispy computations from JobCluster, DispyJob and DispyJobArray manifests, without Kubernetes",
    long_about = "Run dispy computations from the same JobCluster, DispyJob and DispyJobArray \
                  manifests that `kubectl apply` takes, on local or LAN nodes (dispynode). With \
                  no node given, local nodes are started for the run and stopped at its end."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run every DispyJob and DispyJobArray of the manifests on their JobClusters'
    /// computations.
    Run {
        /// Manifest files (multi-document YAML; ConfigMaps included); `-` reads stdin.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// Output: tables like `kubectl get dispyjobs` and `kubectl get dja`, the full objects,
        /// or (jsonl) the arrays' result rows.
        #[arg(short = 'o', long, value_enum, default_value_t = output::Format::Table)]
        output: output::Format,
        /// Local nodes to start when no node is given.
        #[arg(long = "nodes", default_value_t = 1)]
        local_nodes: usize,
        #[command(flatten)]
        nodes: NodeArgs,
        /// Seconds between pulses with the nodes; a node silent for five is lost.
        #[arg(long, default_value_t = 2)]
        pulse_interval: u64,
        /// No progress output.
        #[arg(short, long)]
        quiet: bool,
        /// Where files that jobs send (`dispy_send_file`) are saved: DIR/JOB/NAME (DIR/NAMESPACE/JOB/NAME
        /// outside the default namespace).
        #[arg(long, default_value = ".")]
        files_dir: PathBuf,
        /// Where each DispyJobArray's result rows are written, in index order: DIR/NAME.results.jsonl
        /// (DIR/NAMESPACE/NAME.results.jsonl outside the default namespace); with `-o jsonl`
        /// they go to stdout instead.
        #[arg(long, default_value = ".")]
        results_dir: PathBuf,
    },
    /// Print a DispyJobArray's result rows from a Kubernetes cluster, as JSON lines in index
    /// order.
    Results(results::ResultsArgs),
    /// List reachable nodes: cpus, busy, version.
    Nodes {
        #[command(flatten)]
        nodes: NodeArgs,
    },
}

/// Which nodes to use and how to authenticate to them.
#[derive(clap::Args)]
struct NodeArgs {
    /// A node to use, `host[:port]` (repeatable); `dispy run` then starts no local node.
    #[arg(short = 'n', long = "node")]
    nodes: Vec<String>,
    /// Find nodes by UDP broadcast on the local networks.
    #[arg(long)]
    discover: bool,
    /// The nodes' shared secret.
    #[arg(
        short = 's',
        long,
        env = "DISPY_SECRET",
        default_value = "",
        hide_env_values = true
    )]
    secret: String,
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DISPY_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let code = runtime.block_on(async {
        match cli.command {
            Cmd::Run {
                files,
                output,
                local_nodes,
                nodes:
                    NodeArgs {
                        nodes,
                        discover,
                        secret,
                    },
                pulse_interval,
                quiet,
                files_dir,
                results_dir,
            } => {
                let plan = match load::load(&files) {
                    Ok(p) => p,
                    Err(e) => {
                        eprintln!("dispy: {e}");
                        return 2;
                    }
                };
                let opts = run::RunOptions {
                    local_nodes,
                    nodes,
                    discover,
                    secret,
                    pulse_interval: Duration::from_secs(pulse_interval.max(1)),
                    quiet,
                    files_dir,
                    results_dir: (output != output::Format::Jsonl).then_some(results_dir),
                };
                match run::run(&plan, &opts).await {
                    Ok(mut report) => {
                        let table = output::render(&report, output);
                        if output == output::Format::Jsonl {
                            if !quiet {
                                eprint!("{table}");
                            }
                        } else {
                            print!("{table}");
                        }
                        match write_results(&mut report, quiet) {
                            Ok(()) if report.all_finished() => 0,
                            Ok(()) => 1,
                            Err(e) => {
                                eprintln!("dispy: {e}");
                                2
                            }
                        }
                    }
                    Err(e) => {
                        eprintln!("dispy: {e}");
                        2
                    }
                }
            }
            Cmd::Results(args) => results::results(args).await,
            Cmd::Nodes {
                nodes:
                    NodeArgs {
                        nodes,
                        discover,
                        secret,
                    },
            } => output::nodes(nodes, discover, secret).await,
        }
    });
    std::process::exit(code);
}

/// Arrays' rows spooled for stdout go there, one array after another; a results file that
/// could not be written is an error.
fn write_results(report: &mut run::Report, quiet: bool) -> Result<(), String> {
    let mut stdout = std::io::stdout().lock();
    for a in &mut report.arrays {
        let rows = std::mem::replace(&mut a.rows, run::Rows::Failed(String::new()));
        match rows {
            run::Rows::Written(path) if !quiet => {
                eprintln!(
                    "dispy: DispyJobArray {}: results in {}",
                    a.name,
                    path.display()
                )
            }
            run::Rows::Written(_) => {}
            run::Rows::Spooled(spool) => spool.finish(&mut stdout)?,
            run::Rows::Failed(e) => return Err(format!("DispyJobArray {}: {e}", a.name)),
        }
    }
    Ok(())
}
