//! Shared core of dispy on Kubernetes: the job model, the native wire protocol between
//! clients and `dispynode`, a client for it, and the scheduler with what drives it. No
//! Kubernetes and no process management here.

pub mod array;
pub mod auth;
pub mod client;
pub mod discovery;
pub mod driver;
pub mod frame;
pub mod job;
pub mod manifest;
pub mod pickle;
pub mod protocol;
pub mod scheduler;
pub mod tls;

pub use client::{ClientConfig, ClientError, ClientEvent, NodeClient};
pub use job::{JobId, JobResult, JobStatus};
