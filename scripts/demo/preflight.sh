# shellcheck shell=bash
# Checks of the flow's arguments, the stack settings and the tools, before anything is
# created. Sourced by flow.sh; each check exits with a message that names the value and
# the fix.

STACK_HINT='run scripts/stack.sh up and source $RUN/env.sh (scripts/demo.sh does both)'

check_arguments() {
    [[ $NAME =~ ^[a-z0-9][a-z0-9-]{0,39}$ && $NAME != *- ]] ||
        die "invalid --name \"$NAME\": use 1 to 40 lowercase letters, digits and '-', starting and ending with a letter or digit"
    [[ $MOUNTPOINT == /* ]] || die "invalid --mountpoint \"$MOUNTPOINT\": give an absolute path"
    [[ $MOUNTPOINT =~ ^[A-Za-z0-9._/-]+$ ]] ||
        die "invalid --mountpoint \"$MOUNTPOINT\": use only letters, digits, '.', '_', '-' and '/' (the path goes into TOML and smb.conf)"
    MOUNTPOINT=${MOUNTPOINT%/}
    [[ -n $MOUNTPOINT ]] || die "invalid --mountpoint \"/\""
}

check_stack() {
    local var
    for var in DATANET_RUN_DIR DATANET_S3_ENDPOINT DATANET_S3_REGION DATANET_S3_ACCESS_KEY_ID \
        DATANET_S3_SECRET_FILE DATANET_SLURM_CONF DATANET_SCRATCH_ROOT DATANET_SMB_CONF \
        DATANET_SMB_PORT DATANET_SAMBA_TOKEN_KEY_FILE DATANET_GARAGE DATANET_GARAGE_CONFIG; do
        [[ -n ${!var:-} ]] || die "$var is not set: $STACK_HINT"
    done
    [[ -r $DATANET_S3_SECRET_FILE ]] || die "cannot read DATANET_S3_SECRET_FILE=$DATANET_S3_SECRET_FILE: $STACK_HINT"
    [[ -r $DATANET_SAMBA_TOKEN_KEY_FILE ]] ||
        die "cannot read DATANET_SAMBA_TOKEN_KEY_FILE=$DATANET_SAMBA_TOKEN_KEY_FILE: $STACK_HINT"
}

check_tools() {
    local tool
    for tool in datanet jobwrap samba-provisioner; do
        [[ -x $BIN_DIR/$tool ]] ||
            die "$BIN_DIR/$tool is missing: build with \`cargo build --workspace\` or set DATANET_BIN_DIR"
    done
    for tool in ccx gmsh smbclient sbatch curl python3 fusermount3 mountpoint; do
        command -v "$tool" >/dev/null || die "$tool is not installed: run scripts/setup.sh"
    done
    [[ -d $CCX_TESTS ]] || die "$CCX_TESTS is missing: install calculix-ccx-test (scripts/setup.sh does)"
    [[ -d $GMSH_DEMOS ]] || die "$GMSH_DEMOS is missing: install gmsh-doc (scripts/setup.sh does)"
}

# Fails unless PATH is free for a new mount: absent, or an empty directory that
# nothing is mounted on.
check_mountpoint_free() {
    if mountpoint -q "$MOUNTPOINT" 2>/dev/null; then
        die "$MOUNTPOINT is taken (something is mounted there); pass --mountpoint PATH with another path"
    fi
    if [[ -e $MOUNTPOINT && ! -d $MOUNTPOINT ]]; then
        die "$MOUNTPOINT is taken (it is not a directory); pass --mountpoint PATH with another path"
    fi
    if [[ -d $MOUNTPOINT && -n $(ls -A "$MOUNTPOINT") ]]; then
        die "$MOUNTPOINT is taken (the directory is not empty); pass --mountpoint PATH with another path"
    fi
}
