#!/bin/sh
# Makes containerd's config import /etc/containerd/conf.d/*.toml, where `make install` puts the
# drop-in that registers the CRI handler "cocoon". Idempotent; says what it changed; keeps a
# backup of a config it edits; never restarts containerd (it says when a restart is needed).
set -eu
CONF=${CONTAINERD_CONFIG:-/etc/containerd/config.toml}
GLOB=${COCOON_IMPORT_GLOB:-/etc/containerd/conf.d/*.toml}
LINE="imports = [\"$GLOB\"]"

restart_note() {
  if pgrep -x containerd >/dev/null 2>&1; then
    echo "NOTE: containerd is running and reads its config only at start: restart it (e.g. systemctl restart containerd) to load the 'cocoon' handler"
  fi
}

if [ ! -f "$CONF" ]; then
  mkdir -p "$(dirname "$CONF")"
  printf 'version = 2\n%s\n' "$LINE" > "$CONF"
  echo "wrote $CONF importing $GLOB"
  restart_note
  exit 0
fi
if grep -qF "$GLOB" "$CONF"; then
  echo "$CONF already imports $GLOB"
  exit 0
fi
backup="$CONF.before-cocoon"
[ -e "$backup" ] || cp -p "$CONF" "$backup"
if grep -qE '^[[:space:]]*imports[[:space:]]*=' "$CONF"; then
  # An imports list exists (one line, as containerd writes it): add the glob to it.
  sed -i -E "s|^([[:space:]]*imports[[:space:]]*=[[:space:]]*\[)|\1\"$GLOB\", |" "$CONF"
  echo "added $GLOB to the imports of $CONF (backup: $backup)"
else
  # Top-level keys must come before the first table: put it after `version`, or first.
  if grep -qE '^[[:space:]]*version[[:space:]]*=' "$CONF"; then
    sed -i -E "0,/^[[:space:]]*version[[:space:]]*=.*/s||&\n$LINE|" "$CONF"
  else
    sed -i "1i $LINE" "$CONF"
  fi
  echo "added '$LINE' to $CONF (backup: $backup)"
fi
restart_note
