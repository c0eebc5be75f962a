#!/bin/sh
# One-shot MinIO set-up: the bucket, and a job user limited to read/write (the root keys stay with
# MinIO). Secret keys reach `mc` on its stdin through the shell's printf builtin, which starts no
# process: a key in a command's arguments would be readable by every process on the host.
set -eu
printf '%s\n%s\n' "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" | mc alias set local http://minio:9000 >/dev/null
mc mb --ignore-existing "local/$S3_BUCKET"
# The access key id is the user's name, not a secret; the secret key goes in on stdin.
printf '%s\n' "$AWS_SECRET_ACCESS_KEY" | mc admin user add local "$AWS_ACCESS_KEY_ID" >/dev/null
mc admin user info local "$AWS_ACCESS_KEY_ID" | grep -q readwrite ||
  mc admin policy attach local readwrite --user "$AWS_ACCESS_KEY_ID"
