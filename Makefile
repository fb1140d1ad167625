# Entry points. Each one installs what it needs first (Debian packages, the test guest).
.PHONY: demo test bench deps guest lint

deps:
	bash scripts/install-deps.sh

guest:
	bash scripts/guest/build.sh

demo:
	bash scripts/demo.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets --locked -- -D warnings

# The whole suite: unit tests and end-to-end tests with real QEMU guests (TCG).
test: deps guest lint
	cargo test --locked --workspace -- --test-threads=2

bench: deps
	bash scripts/bench.sh
	bash scripts/bench-failover.sh
	bash scripts/bench-failback.sh
	bash scripts/bench-history.sh
