#!/bin/sh
# Refuses to start the stack while a setting is empty or still the placeholder from .env.example.
# Usage: check-env.sh NAME... -- the names only: values are read from the environment, so no
# secret ever appears in this process's arguments.
set -eu
status=0
for name in "$@"; do
  case "$name" in
    "" | [0-9]* | *[!A-Za-z0-9_]*)
      echo "check-env: '$name' is not a variable name" >&2
      exit 2
      ;;
  esac
  eval "value=\${$name-}"
  case "$value" in
    "")
      echo "check-env: $name is empty: set it in .env (see .env.example)" >&2
      status=1
      ;;
    replace-with*)
      echo "check-env: $name is still the placeholder from .env.example ('replace-with-...'): put a real value in .env" >&2
      status=1
      ;;
  esac
done
if [ "$status" -eq 0 ]; then
  echo "check-env: $# settings present, none is a placeholder"
fi
exit "$status"
