//! samba-provisioner library.
