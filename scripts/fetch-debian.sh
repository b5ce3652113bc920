#!/usr/bin/env bash
# Fetches Debian packages of another release into PREFIX without installing anything
# system-wide: downloaded with a private apt configuration whose source list is derived from
# this system's own Debian sources with the suite changed, then unpacked with `dpkg -x`.
# A PREFIX that already has CHECK (a path inside it) is kept. Used by fetch-docker.sh and
# fetch-containerd.sh.
#
#   scripts/fetch-debian.sh SUITE PREFIX CHECK PACKAGE...
set -euo pipefail

suite=${1:?usage: fetch-debian.sh SUITE PREFIX CHECK PACKAGE...}
prefix=${2:?usage: fetch-debian.sh SUITE PREFIX CHECK PACKAGE...}
check=${3:?usage: fetch-debian.sh SUITE PREFIX CHECK PACKAGE...}
shift 3
if [ -x "$prefix/$check" ]; then
  exit 0
fi

. /etc/os-release
codename=${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}

# The first archive URI (and its key) that serves this release's main suite, from the deb822
# sources or the one-line list. No mirror is named here: it is whatever this system uses.
read -r uri keyring < <(
  {
    cat /etc/apt/sources.list.d/*.sources 2>/dev/null
    echo
  } | awk -v c="$codename" '
      /^[[:space:]]*$/ { if (u != "" && s ~ "(^| )" c "( |$)") { print u, (k == "" ? "-" : k); exit }
                         u = ""; s = ""; k = ""; next }
      /^URIs:/      { u = $2 }
      /^Suites:/    { $1 = ""; s = $0 " " }
      /^Signed-By:/ { k = $2 }'
  if [ -f /etc/apt/sources.list ]; then
    awk -v c="$codename" '$1 == "deb" && $0 !~ /\[/ && $3 == c { print $2, "-"; exit }' \
      /etc/apt/sources.list
  fi
)
if [ -z "${uri:-}" ]; then
  echo "fetch-debian: no Debian source for $codename in /etc/apt" >&2
  exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/sources" "$work/lists/partial" "$work/cache/archives/partial" "$work/debs"
{
  echo "Types: deb"
  echo "URIs: $uri"
  echo "Suites: $suite"
  echo "Components: main"
  if [ "$keyring" != "-" ]; then echo "Signed-By: $keyring"; fi
} >"$work/sources/fetch.sources"
cat >"$work/apt.conf" <<EOF
Dir::Etc::SourceList "/dev/null";
Dir::Etc::SourceParts "$work/sources";
Dir::State::Lists "$work/lists";
Dir::Cache "$work/cache";
APT::Sandbox::User "root";
EOF
export APT_CONFIG="$work/apt.conf"
apt-get update -q >&2
(cd "$work/debs" && apt-get download -q "$@" >&2)

staging="$prefix.partial"
rm -rf "$staging"
mkdir -p "$staging"
for deb in "$work"/debs/*.deb; do
  dpkg -x "$deb" "$staging"
done
test -x "$staging/$check"
rm -rf "$prefix"
mv "$staging" "$prefix"
echo "fetch-debian: $* from $suite in $prefix" >&2
