#!/usr/bin/env bash
# Builds the two S3 servers the S3 backend's tests run against
# (internal/backend/s3/s3test) into a cache outside the repository:
#   versitygw  a gateway serving a directory as S3
#   weed       SeaweedFS, run as its all-in-one `weed mini`
# Each is built once from pinned versions, in a scratch module under the
# cache (~/.cache/kura/s3/src/NAME; KURA_S3_CACHE moves the whole cache),
# and skipped when the binary of that version is there. About 4 minutes
# each on 2 cores the first time, nothing afterwards.
set -euo pipefail

export PATH="$PATH:/usr/local/go/bin"
VERSITYGW_VERSION=v1.8.0
# SeaweedFS 4.53; its go.mod has a replace directive, so `go install
# pkg@version` refuses it: it is built from a scratch module that repeats
# the replacement.
SEAWEEDFS_VERSION=v0.0.0-20261109003541-7506e5f91cd6

cache="${KURA_S3_CACHE:-$HOME/.cache/kura/s3}"
bin="$cache/bin"
mkdir -p "$bin" "$cache/src"
export GOFLAGS="-mod=mod -buildvcs=false"

# build NAME MODULE VERSION PACKAGE [REPLACE]: builds PACKAGE of MODULE at
# VERSION into $bin/NAME unless $bin/NAME.version says it is there.
build() {
  local name=$1 module=$2 version=$3 pkg=$4 replace=${5:-}
  local stamp="$bin/$name.version"
  if [ -x "$bin/$name" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$module@$version" ]; then
    return 0
  fi
  echo "s3servers: building $name ($module@$version; a few minutes, once)"
  local src="$cache/src/$name"
  rm -rf "$src"
  mkdir -p "$src"
  (
    cd "$src"
    go mod init "kura-s3-$name" >/dev/null 2>&1
    if [ -n "$replace" ]; then
      echo "replace $replace" >>go.mod
    fi
    go get "$pkg@$version" >get.log 2>&1 || { cat get.log >&2; exit 1; }
    local start=$SECONDS
    go build -trimpath -ldflags="-s -w" -o "$bin/$name.tmp" "$pkg"
    mv "$bin/$name.tmp" "$bin/$name"
    echo "$module@$version" >"$stamp"
    echo "s3servers: built $name in $((SECONDS - start)) s"
  )
}

build versitygw github.com/versity/versitygw "$VERSITYGW_VERSION" github.com/versity/versitygw/cmd/versitygw
build weed github.com/seaweedfs/seaweedfs "$SEAWEEDFS_VERSION" github.com/seaweedfs/seaweedfs/weed \
  "github.com/tyler-smith/go-bip39 => github.com/cosmos/go-bip39 v1.0.0"
