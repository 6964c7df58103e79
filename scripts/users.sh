#!/bin/bash
# The host's roles as users and groups (issue 17). Idempotent; run as root
# (`make deps` does).
#
#   ssc-provider  group: its members are the provider's admins; they reach
#                 the builders' provider sockets (/run/ssc/provider) and
#                 nothing else of a meta-domain.
#   ssc-admin     a provider admin (member of ssc-provider) for the demo
#                 and the roles tests.
set -euo pipefail
if [ "$(id -u)" != 0 ]; then
    echo "scripts/users.sh: run as root (it adds the group ssc-provider and the user ssc-admin)" >&2
    exit 1
fi
getent group ssc-provider >/dev/null || groupadd --system ssc-provider
if ! id ssc-admin >/dev/null 2>&1; then
    useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin ssc-admin
fi
id -nG ssc-admin | tr ' ' '\n' | grep -qx ssc-provider || usermod -aG ssc-provider ssc-admin
