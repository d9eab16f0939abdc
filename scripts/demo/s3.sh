# shellcheck shell=bash
# Direct S3 requests to the stack's Garage with curl's SigV4 signing, to check what the
# mount and the tools stored. The key pair reaches curl on standard input, never in its
# argument list. Sourced by flow.sh.

s3_curl() {
    local secret
    secret=$(<"$DATANET_S3_SECRET_FILE")
    printf 'user = "%s:%s"\n' "$DATANET_S3_ACCESS_KEY_ID" "$secret" |
        curl -sS --fail-with-body -K - --aws-sigv4 "aws:amz:$DATANET_S3_REGION:s3" \
            -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD' "$@"
}

# Downloads object KEY of BUCKET to FILE.
s3_get() {
    local bucket=$1 key=$2 file=$3
    s3_curl -o "$file" "$DATANET_S3_ENDPOINT/$bucket/$key"
}

# Prints the size in bytes of object KEY of BUCKET (from a HEAD request).
s3_size() {
    local bucket=$1 key=$2 headers
    headers=$(s3_curl -I "$DATANET_S3_ENDPOINT/$bucket/$key") || return 1
    awk 'tolower($1) == "content-length:" { gsub(/\r/, "", $2); print $2 }' <<<"$headers"
}
