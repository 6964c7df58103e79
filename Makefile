# Entry points. `make demo` and `make test` work on a fresh Debian machine
# with a Rust toolchain: they install what is missing first.
SHELL := /bin/bash
CARGO ?= cargo
SSC := target/debug/ssc
IMAGES_DIR := kernels/target/x86_64-unknown-linux-gnu/release
DEB_PACKAGES := qemu-system-x86 qemu-utils swtpm swtpm-tools tpm2-tools libtss2-dev util-linux python3 libnbd-bin \
	fio kmod busybox-static cpio cryptsetup-bin make binutils opensc softhsm2 libengine-pkcs11-openssl openssl
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all deps images ssc catalog client demo test test-host test-qemu test-fuzz lint fmt bench fuzz clean

all: catalog

## deps: install Debian packages and rustup components that are missing
# Two passes: installing one package can remove another (on the project's
# machines, qemu-system-x86 7.2 replaces the image's backported qemu-utils
# 10.0, taking qemu-img away), so the list is checked again afterwards.
deps:
	@for pass in 1 2; do \
		missing=""; for p in $(DEB_PACKAGES); do \
			dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
		done; \
		[ -z "$$missing" ] && break; \
		echo "installing:$$missing"; \
		[ $$pass = 1 ] && $(SUDO) apt-get update -q; \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $$missing || exit 1; \
	done
	@command -v qemu-img >/dev/null || { echo "deps: qemu-img still missing after install" >&2; exit 1; }
	@rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
	@rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
	@$(SUDO) scripts/users.sh

## images: build every unikernel image (kernels/ workspace)
images:
	cd kernels && $(CARGO) build --release

## ssc: build the host CLI
ssc:
	$(CARGO) build -p host-tools -p ssc-pkcs11 --lib --bin ssc --bin ssc-p11bench

## catalog: sign the built images into build/catalog with a local publisher key
catalog: images ssc
	@mkdir -p build
	@[ -f build/publisher.pk8 ] || $(SSC) catalog keygen --private build/publisher.pk8 --public build/publisher.pub
	$(SSC) catalog build --key build/publisher.pk8 --out build/catalog
	$(SSC) catalog verify build/catalog --trust build/publisher.pub

## client: the Linux client VM from Debian packages (cached in build/client) and its introspection profile
client: deps ssc
	bash scripts/build-client.sh build/client
	$(SSC) profile build --kernel build/client/vmlinuz --system-map build/client/System.map --out build/client/profile.ssc

## demo: install, build, boot the self-test through the builder, show the catalog refusing tampering
demo: deps catalog client
	bash scripts/demo.sh

## test: every test: host unit tests, runtime unit tests, QEMU boots, lint
test: deps catalog client lint test-host test-fuzz test-qemu

test-host:
	cd kernels && $(CARGO) test -p ssc-runtime
	$(CARGO) test --workspace --exclude qemu-tests

test-qemu:
	$(CARGO) test -p qemu-tests -- --test-threads=2

## test-fuzz: every fuzz target for 20 s from its committed seeds; fails on any crash (FUZZING.md)
test-fuzz:
	bash scripts/fuzz.sh 20

## lint: rustfmt and clippy on both workspaces
lint:
	$(CARGO) fmt --all --check
	cd kernels && $(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	cd kernels && $(CARGO) clippy --release -- -D warnings

fmt:
	$(CARGO) fmt --all
	cd kernels && $(CARGO) fmt --all

## bench: boot-time table (median of 20 boots per combination), the storage, checkpoint, dedup and HSM cores natively
bench: deps catalog
	$(SSC) bench boot --catalog build/catalog --trust build/publisher.pub --runs 20
	$(CARGO) run --release -q -p host-tools --bin ssc -- bench storage-core
	$(CARGO) run --release -q -p host-tools --bin ssc -- bench checkpoint-core
	$(CARGO) run --release -q -p host-tools --bin ssc -- bench dedup-core
	$(CARGO) build --release -q -p ssc-pkcs11 --bin ssc-p11bench
	$(CARGO) run --release -q -p host-tools --bin ssc -- bench hsm-core

## fuzz: every fuzz target for 60 s each (cargo-fuzz; stable via RUSTC_BOOTSTRAP); FUZZ_SECONDS=600 for longer
fuzz:
	bash scripts/fuzz.sh $${FUZZ_SECONDS:-60}

clean:
	$(CARGO) clean
	cd kernels && $(CARGO) clean
	rm -rf build
