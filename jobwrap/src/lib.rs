//! jobwrap: runs Slurm batch jobs whose data lives in storage spaces.
//!
//! A job is declared with `#DATANET` directives, command-line flags ([`directive`],
//! [`sbatch_options`]) or a job file ([`jobfile`]). [`flow`] stages its inputs in from
//! the object stores ([`stage_in`]), submits it with sbatch ([`slurm`], [`wrapper`]),
//! tracks it ([`track`]), stages its outputs out ([`stage_out`]) and records every step
//! in the [`ledger`], so that `resume` can finish a job after jobwrap was killed.

pub mod directive;
pub mod error;
pub mod fault;
pub mod flow;
pub mod jobfile;
pub mod ledger;
pub mod local_space;
pub mod location;
pub mod placement;
pub mod progress;
pub mod sbatch_options;
pub mod slurm;
pub mod spec;
pub mod stage_in;
pub mod stage_out;
pub mod state;
pub mod track;
pub mod workdir;
pub mod wrapper;

pub use error::{JobError, SpecError};
pub use flow::Jobwrap;
pub use ledger::{JobRecord, Ledger};
pub use spec::JobSpec;
pub use state::{JobState, Phase};
