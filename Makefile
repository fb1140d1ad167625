# Entry points. Each one installs what it needs first (Debian packages, the test guest).
.PHONY: demo demo-two-sites test bench bench-two-sites deps guest lint

deps:
	bash scripts/install-deps.sh

guest:
	bash scripts/guest/build.sh

demo:
	bash scripts/demo.sh

demo-two-sites:
	bash scripts/demo-two-sites.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets --locked -- -D warnings

# The whole suite: unit tests and end-to-end tests with real QEMU guests (TCG). Every
# standby process logs the fail points it reaches; the last test proves all were reached.
FAILPOINT_LOG := $(CURDIR)/target/failpoints-reached.log
test: deps guest lint
	mkdir -p target && rm -f $(FAILPOINT_LOG)
	STANDBY_FAILPOINT_LOG=$(FAILPOINT_LOG) cargo test --locked --workspace -- --test-threads=2
	STANDBY_FAILPOINT_LOG=$(FAILPOINT_LOG) cargo test --locked -p standby-cli --test crash -- --ignored every_fail_point_was_reached_by_the_suite

bench: deps
	bash scripts/bench.sh
	bash scripts/bench-failover.sh
	bash scripts/bench-failback.sh
	bash scripts/bench-history.sh
	bash scripts/bench-two-sites.sh

bench-two-sites: deps
	bash scripts/bench-two-sites.sh
