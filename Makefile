# Cocoon: `make setup` then `make test` on a fresh Debian 12 machine, as root.

PREFIX      ?= /usr/local
IMAGE_DIR   ?= $(PREFIX)/share/cocoon
CONFIG_DIR  ?= /etc/cocoon
CARGO       ?= cargo
# The agent is PID 1 in an initramfs with no libc: link it statically.
AGENT_TARGET := x86_64-unknown-linux-gnu
AGENT_BIN    := target/$(AGENT_TARGET)/release/cocoon-agent
SHIM_BIN     := target/release/containerd-shim-cocoon-v2
CLI_BIN      := target/release/cocoon
ROOTFS_BIN   := target/release/cocoon-rootfs

APT_PACKAGES := qemu-system-x86 kmod cpio busybox-static dpkg containerd runc runsc bc fonts-dejavu-core \
                python3 python3-venv \
                libseccomp-dev libcap-ng-dev pkg-config ca-certificates \
                containernetworking-plugins protobuf-compiler iproute2 gcc libc6-dev erofs-utils e2fsprogs
# Helper daemons from crates.io, pinned to the versions checked on these machines.
HELPERS      := virtiofsd@1.14.0 vhost-device-vsock@0.3.0

export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: setup deps helpers static-helpers tools qemu build agent image deploy-image install test test-containerd2 conformance test-cloud-hypervisor test-template-off bench soak demo clean

setup: deps helpers static-helpers tools qemu build image install

deps:
	apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(APT_PACKAGES)

# Skipped for a helper already installed.
helpers:
	@for h in $(HELPERS); do \
	  name=$${h%@*}; \
	  if command -v $$name >/dev/null 2>&1 || [ -x $(PREFIX)/bin/$$name ]; then \
	    echo "$$name: already installed ($$(command -v $$name || echo $(PREFIX)/bin/$$name))"; \
	  else \
	    echo "cargo install $$h"; \
	    $(CARGO) install --locked --root $(PREFIX) $$h || exit 1; \
	  fi; \
	done

# The helpers as static binaries for the deploy image (`make deploy-image`), built once.
STATIC_HELPERS := /usr/local/lib/cocoon/static-helpers
static-helpers:
	scripts/static-helpers.sh $(STATIC_HELPERS)

# kubernetes-validate (Kubernetes' own schemas, in a venv): the tests check deploy/ with it.
KUBE_VALIDATE := /usr/local/lib/cocoon/kubernetes-validate
tools:
	@if [ -x $(KUBE_VALIDATE)/bin/kubernetes-validate ]; then \
	  echo "kubernetes-validate: already installed in $(KUBE_VALIDATE)"; \
	else \
	  python3 -m venv $(KUBE_VALIDATE) && \
	  $(KUBE_VALIDATE)/bin/pip install -q kubernetes-validate==1.37.0; \
	fi

# Cocoon's own QEMU (bookworm-backports' 10 beside Debian 12's 7.2): the shim uses it where it
# is (vmm_driver::config::COCOON_QEMU), and only 8.2 and later let pods share the template's RAM.
COCOON_QEMU_PREFIX := /usr/local/lib/cocoon/qemu
qemu:
	scripts/fetch-qemu.sh $(COCOON_QEMU_PREFIX)

build: agent
	$(CARGO) build --release -p cocoon-shim -p cocoon-rootfs -p cocoon-cli -p cocoon-tests --bins

agent:
	LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH=/usr/lib/x86_64-linux-gnu \
	  RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --release -p cocoon-agent --target $(AGENT_TARGET)

image: agent
	$(CARGO) build --release -p cocoon-rootfs
	$(ROOTFS_BIN) --agent $(AGENT_BIN) --out $(IMAGE_DIR) --work target/image

# The shim goes on PATH, where containerd looks for containerd-shim-<name>-v2; the CRI
# handler "cocoon" is registered through a drop-in that config.toml imports.
install: build
	install -D -m 0755 $(SHIM_BIN) $(PREFIX)/bin/containerd-shim-cocoon-v2
	install -D -m 0755 $(CLI_BIN) $(PREFIX)/bin/cocoon
	@if [ -f $(CONFIG_DIR)/config.toml ]; then \
	  echo "keeping existing $(CONFIG_DIR)/config.toml"; \
	else \
	  install -D -m 0644 config/config.toml $(CONFIG_DIR)/config.toml; \
	fi
	install -D -m 0644 config/containerd-cocoon.toml /etc/containerd/conf.d/cocoon.toml
	scripts/containerd-imports.sh

# containerd 2.x beside the system's 1.6: Debian sid's, fetched into a private prefix (nothing
# installed system-wide). `make test` runs the restart and ctr suites against it too.
CONTAINERD2_PREFIX ?= /var/tmp/cocoon-containerd2

# The deploy image (issue #32): an OCI archive of static binaries and the guest image, which
# cocoon-deploy installs on Kubernetes nodes (docs/kubernetes.md). Loaded with `ctr images import`.
DEPLOY_IMAGE := target/deploy/cocoon-deploy.oci.tar
STATIC_BIN   := target/$(AGENT_TARGET)/release
deploy-image: image static-helpers
	LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH=/usr/lib/x86_64-linux-gnu \
	  RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --release --target $(AGENT_TARGET) \
	  -p cocoon-shim -p cocoon-cli -p cocoon-deploy --bins
	$(CARGO) run --release -p cocoon-tests --bin cocoon-deploy-image -- --out $(DEPLOY_IMAGE) \
	  --image-dir $(IMAGE_DIR) --shim $(STATIC_BIN)/containerd-shim-cocoon-v2 \
	  --cli $(STATIC_BIN)/cocoon --deploy $(STATIC_BIN)/cocoon-deploy \
	  --virtiofsd $(STATIC_HELPERS)/bin/virtiofsd \
	  --vhost-device-vsock $(STATIC_HELPERS)/bin/vhost-device-vsock

test: build image deploy-image
	$(CARGO) test --release --workspace
	COCOON_TEST_VSOCK=hybrid $(CARGO) test --release -p cocoon-tests --test ctr --test restart \
	  --test lean_pods --test faults
	scripts/fetch-containerd.sh $(CONTAINERD2_PREFIX)
	COCOON_TEST_CONTAINERD_BIN=$(CONTAINERD2_PREFIX)/usr/bin $(CARGO) test --release -p cocoon-tests \
	  --test restart --test ctr

# The ctr, restart and CRI suites against containerd 2.x.
test-containerd2: build image
	scripts/fetch-containerd.sh $(CONTAINERD2_PREFIX)
	COCOON_TEST_CONTAINERD_BIN=$(CONTAINERD2_PREFIX)/usr/bin $(CARGO) test --release -p cocoon-tests \
	  --test ctr --test restart --test cri --test cri_host_ns

# critest, the CRI validation suite, against runc and Cocoon side by side, offline (not part of
# `make test`: critest comes from a cri-tools checkout CI can't fetch, and a run takes about an
# hour here). CRI_TOOLS=<checkout>; results in target/conformance/, recorded in
# docs/conformance.md.
conformance: build image
	scripts/conformance.sh

# The shim's end-to-end suites with Cloud Hypervisor (on PATH; not installed by setup). Each
# case prints why it skipped where CH can't boot a guest (no usable KVM).
test-cloud-hypervisor: image
	COCOON_TEST_HYPERVISOR=cloud-hypervisor $(CARGO) test --release -p cocoon-tests \
	  --test cloud_hypervisor --test containers --test ctr -- --nocapture

# The shim's end-to-end suites with every pod booting its kernel (vm.template = "off"); `make
# test` runs them from the VM template, the default.
test-template-off: image
	COCOON_TEST_TEMPLATE=off $(CARGO) test --release -p cocoon-tests \
	  --test ctr --test containers --test cri --test docker --test faults --test volumes \
	  --test lean_pods --test copied_files

# Cocoon vs runc vs gVisor on one machine in one run; BENCH_RUNS=N samples per figure.
# Writes target/bench/results.{json,md}. Not a test: nothing here asserts on timing.
bench: build image
	target/release/cocoon-bench

# Many pods at once through create/exec/fault/kill/delete rounds with helpers killed and guests
# frozen at random; then nothing may be left. Minutes long, so not part of `make test`.
# SOAK_PODS (10), SOAK_ROUNDS (3), SOAK_MINUTES (20), SOAK_SEED. Writes target/soak/results.md.
soak: build image
	target/release/cocoon-soak

demo: build
	scripts/demo.sh

clean:
	$(CARGO) clean
