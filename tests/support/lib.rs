//! Helpers shared by the end-to-end tests: the settings of the service stack that
//! `scripts/stack.sh up` started, and paths of the built binaries.
