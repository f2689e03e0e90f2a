#!/bin/sh
# Entrypoint of the facerec image: reads the API keys from a mounted secret file when
# FACEREC_API_KEYS_FILE is set (compose secrets, Kubernetes secret volumes), so keys never have to
# sit in an image, a compose file or a process listing, then runs the command (facerec-serve).
#
# The file holds one key per line (or comma-separated keys); blank lines and lines starting with #
# are ignored. The service itself checks the keys (length, placeholders) and refuses weak ones.
set -eu

if [ -n "${FACEREC_API_KEYS_FILE:-}" ]; then
    if [ -n "${FACEREC_API_KEYS:-}" ]; then
        echo "facerec: set FACEREC_API_KEYS or FACEREC_API_KEYS_FILE, not both" >&2
        exit 2
    fi
    if [ ! -f "$FACEREC_API_KEYS_FILE" ] || [ ! -r "$FACEREC_API_KEYS_FILE" ]; then
        echo "facerec: FACEREC_API_KEYS_FILE=$FACEREC_API_KEYS_FILE is not a readable file" >&2
        exit 2
    fi
    keys=$(sed -e '/^[[:space:]]*#/d' -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' "$FACEREC_API_KEYS_FILE" \
        | tr '\n' ',')
    if [ -z "$(printf '%s' "$keys" | tr -d ',')" ]; then
        echo "facerec: FACEREC_API_KEYS_FILE=$FACEREC_API_KEYS_FILE holds no key" >&2
        exit 2
    fi
    FACEREC_API_KEYS=$keys
    export FACEREC_API_KEYS
    unset FACEREC_API_KEYS_FILE
fi

if [ "$#" -eq 0 ]; then
    set -- facerec-serve
fi
exec "$@"
