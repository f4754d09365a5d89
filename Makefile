# Kura: the two commands a newcomer needs are `make demo` and `make test`.
export PATH := $(PATH):/usr/local/go/bin
GO ?= go

.PHONY: all build deps deps-test guest demo demo-image test test-short tidy-check bench bench-s3 bench-vm bench-restore vet clean

all: build

deps:
	@bash scripts/deps.sh

# deps, and the S3 servers the tests run (built once into ~/.cache/kura/s3).
deps-test:
	@bash scripts/deps.sh --s3

# The version kura version prints: `git describe` of the checkout (a tag,
# or the commit, "-dirty" with local changes), or "dev" without git. This
# also covers what the Go toolchain does not stamp by itself (builds with
# -buildvcs=false, git worktrees). Override with make build VERSION=v1.2.3.
VERSION ?= $(shell git describe --always --dirty 2>/dev/null)
LDFLAGS := $(if $(VERSION),-X github.com/kura-backup/kura/internal/buildinfo.Version=$(VERSION))

build:
	$(GO) build -ldflags '$(LDFLAGS)' -o bin/kura ./cmd/kura

# The cached Debian test guest (built once with debootstrap, a few minutes),
# before the tests so that no test waits on the build under its timeout.
guest:
	@bash scripts/mkguest.sh

# Installs what is missing, builds, and runs the main job end to end on a
# live VM (the first run builds the test guest image: a few minutes).
demo: deps build
	$(GO) run ./cmd/kura-demo

# The same on a generated disk image, without a VM.
demo-image: deps build
	@bash scripts/demo.sh

# Installs what is missing and runs every test, integration tests included.
test: deps-test guest tidy-check
	$(GO) vet ./...
	@test -z "$$(gofmt -l cmd internal bench)" || { echo "gofmt needed:"; gofmt -l cmd internal bench; exit 1; }
	$(GO) test -timeout 60m -count=1 ./...

# Fails when go.mod or go.sum are not what `go mod tidy` would write (a
# direct import marked "// indirect", a stale go.sum line). -diff changes
# nothing and prints the diff; it needs only the module proxy.
tidy-check:
	@$(GO) mod tidy -diff || { echo "go.mod/go.sum are not tidy: run 'go mod tidy' and commit"; exit 1; }

# The quick tests only (no VMs, no qemu daemons where avoidable).
test-short:
	$(GO) test -short ./...

bench: deps build
	bash bench/run.sh

# Kura on S3 (versitygw; BENCH_S3_SERVER=weed for SeaweedFS) against restic
# and kopia, the floor of the machine, and the pack size for object storage.
bench-s3: deps-test build
	bash bench/s3.sh

# Live VMs: kura backup vm against virtnbdbackup on the same guest (root).
bench-vm: deps build guest
	bash bench/vm.sh

# Getting VMs back: restore against restic and virtnbdrestore, instant
# recovery against cold boot, file listing (root).
bench-restore: deps build guest
	bash bench/restore-vm.sh

clean:
	rm -rf bin
