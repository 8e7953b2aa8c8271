# wxd — see README.md. `make` builds build/wxd; `make run`, `make test`,
# `make lint`, `make asan`, `make bench`, `make fuzz`, `make deps`.

CC       ?= cc
MULTIARCH := $(shell $(CC) -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
LIBDIR   := /usr/lib/$(MULTIARCH)
LLHTTP_SRC := /usr/share/llhttp
LLHTTP_INC := /usr/share/include/llhttp
LUAJIT_INC := /usr/include/luajit-2.1

# Debian packages the build, the tests and the benchmarks need.
DEB_BUILD := build-essential pkg-config libluajit2-5.1-dev luajit2 libuv1-dev node-llhttp \
             libssl-dev libhiredis-dev lua-cjson-dev libexpat1-dev
# nodejs and nginx are independent peers of specs (AES-GCM against Node's
# crypto, the client's TLS pool against nginx); python3 parses log lines;
# lua-check is luacheck, for `make lint`; python3-prometheus-client is the
# independent parser of /metrics in the metrics spec; chromium (driven by
# puppeteer-core from spec/node) opens the live order page; luarocks
# installs the rock in spec/02-integration/25-first_hour_spec.lua.
DEB_TEST  := lua-busted lua-socket redis-server curl openssl wrk nodejs nginx python3 lua-check \
             python3-prometheus-client chromium luarocks
DEB_BENCH := wrk nginx libnginx-mod-http-lua lua-cjson
DEB_FUZZ  := clang

WARN    := -Wall -Wextra -Werror -Wshadow
CFLAGS  ?= -O2 -g
ALL_CFLAGS := -std=c11 -D_GNU_SOURCE $(WARN) $(CFLAGS) -I$(LUAJIT_INC) -I$(LLHTTP_INC) -Icore
# LuaJIT is linked whole and its symbols exported, so that Lua C modules
# (luasocket, busted's helpers) load into wxd script.
LDLIBS  := -Wl,-E -Wl,--whole-archive $(LIBDIR)/libluajit-5.1.a -Wl,--no-whole-archive \
           $(LIBDIR)/liblua5.1-cjson.a -lhiredis -luv -lssl -lcrypto -lexpat -lpthread -ldl -lm

SRC  := $(wildcard core/*.c)
HDR  := $(wildcard core/*.h)
LLHTTP_C := api.c http.c llhttp.c

BUILD ?= build
OBJ  := $(SRC:core/%.c=$(BUILD)/obj/%.o) $(LLHTTP_C:%.c=$(BUILD)/llhttp/%.o)

.PHONY: all run test lint asan bench bench-watchdog bench-crypto bench-limit bench-mp bench-pay-http bench-ws fuzz deps deps-bench deps-bench-mp deps-fuzz deps-spec-node check-deps clean

all: $(BUILD)/wxd

$(BUILD)/wxd: $(OBJ)
	$(CC) $(ALL_CFLAGS) $(LDFLAGS) -o $@ $(OBJ) $(LDLIBS)

$(BUILD)/obj/%.o: core/%.c $(HDR) | check-deps
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) -c -o $@ $<

# llhttp is third-party C compiled in as shipped: not held to our warnings.
# Its sources come with node-llhttp, which check-deps may install only now:
# make decides which rule builds a target before that, so the rule must not
# need the sources to exist yet (a pattern rule with them as prerequisites
# would not match on a machine without them, and the first `make` would stop
# with "No rule to make target"). The wildcard adds them as prerequisites
# where they exist, so an upgraded package still rebuilds.
LLHTTP_OBJ := $(LLHTTP_C:%.c=$(BUILD)/llhttp/%.o)
$(LLHTTP_OBJ): $(BUILD)/llhttp/%.o: $(wildcard $(LLHTTP_C:%=$(LLHTTP_SRC)/%)) | check-deps
	@mkdir -p $(dir $@)
	$(CC) -std=c11 $(CFLAGS) -w -I$(LLHTTP_INC) -c -o $@ $(LLHTTP_SRC)/$*.c

# Installs what is missing (apt-get; root or sudo); a no-op when everything
# is there. deps-bench adds the peers of `make bench`.
define install_missing
	@missing=""; for p in $(1); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y --no-install-recommends $$missing; \
	fi
endef

deps:
	$(call install_missing,$(DEB_BUILD) $(DEB_TEST))
	@$(MAKE) --no-print-directory deps-spec-node

# The npm packages specs use as independent peers (the `ws` WebSocket
# client of spec/02-integration/23-ws_node_spec.lua), pinned in
# spec/node/package-lock.json and installed into build/spec/node, never
# into the repository. Fetched from the npm registry the first time;
# afterwards nothing is fetched until the lock file changes.
SPEC_NODE := build/spec/node
deps-spec-node: $(SPEC_NODE)/node_modules/.installed

$(SPEC_NODE)/node_modules/.installed: spec/node/package.json spec/node/package-lock.json
	@# Debian's nodejs comes without npm (its npm package); other builds of
	@# Node.js (NodeSource) bring their own and conflict with it.
	@command -v npm >/dev/null || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y --no-install-recommends npm; }
	@mkdir -p $(SPEC_NODE)
	cp spec/node/package.json spec/node/package-lock.json $(SPEC_NODE)/
	cd $(SPEC_NODE) && npm ci --no-audit --no-fund
	@touch $@

deps-bench: deps
	$(call install_missing,$(DEB_BENCH))

# The Node.js peer of bench-mp: the npm packages pinned in
# spec/bench/node/package-lock.json (the `wechat` middleware), installed
# into build/bench/node, never into the repository. Needs node and npm and
# the npm registry the first time; afterwards nothing is fetched until the
# lock file changes.
NODE_PEER := build/bench/node
deps-bench-mp: $(NODE_PEER)/node_modules/.installed

$(NODE_PEER)/node_modules/.installed: spec/bench/node/package.json spec/bench/node/package-lock.json
	@command -v npm >/dev/null || { echo "deps-bench-mp: npm is not installed (Node.js 20 with npm is needed)"; exit 1; }
	@mkdir -p $(NODE_PEER)
	cp spec/bench/node/package.json spec/bench/node/package-lock.json $(NODE_PEER)/
	cd $(NODE_PEER) && npm ci --no-audit --no-fund
	@touch $@

deps-fuzz: deps
	$(call install_missing,$(DEB_FUZZ))

check-deps:
	@for f in $(LUAJIT_INC)/lua.h $(LLHTTP_SRC)/llhttp.c /usr/include/uv.h /usr/include/hiredis/hiredis.h $(LIBDIR)/liblua5.1-cjson.a; do \
	  [ -e $$f ] || { $(MAKE) --no-print-directory deps; break; }; done

run: $(BUILD)/wxd
	$(BUILD)/wxd run .

test: $(BUILD)/wxd
	@$(MAKE) --no-print-directory deps >/dev/null
	WXD=$(BUILD)/wxd spec/run.sh

# luacheck over every Lua file (settings in .luacheckrc; any warning fails),
# then the indentation of the sources: 2 spaces a level, so a line indented
# by an odd number of spaces, or with a tab in its indentation, fails.
# spec/ is left out of that check: some of its continuation lines are
# aligned to odd columns.
LINT_LUA := lua handlers examples spec $(wildcard app.lua config.lua)
LINT_INDENT := lua handlers examples $(wildcard app.lua config.lua)

lint:
	@command -v luacheck >/dev/null || $(MAKE) --no-print-directory deps
	luacheck --no-color -q $(LINT_LUA)
	@bad=$$(find $(LINT_INDENT) -name '*.lua' -exec awk \
	  '/^[ \t]*\t/ { print FILENAME ":" FNR ": a tab in the indentation"; next } \
	   { match($$0, /^ */) } RLENGTH % 2 { print FILENAME ":" FNR ": indented by " RLENGTH " spaces" }' {} +); \
	if [ -n "$$bad" ]; then echo "$$bad"; echo "lint: indent Lua by 2 spaces a level"; exit 1; fi; \
	echo "lint: indentation ok"

asan:
	$(MAKE) BUILD=build/asan CFLAGS="-O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined" \
	  LDFLAGS="-fsanitize=address,undefined" build/asan/wxd
	WXD=build/asan/wxd WXD_SANITIZED=1 ASAN_OPTIONS=detect_leaks=1:exitcode=86 UBSAN_OPTIONS=exitcode=86 spec/run.sh

bench: $(BUILD)/wxd
	@$(MAKE) --no-print-directory deps-bench >/dev/null
	WXD=$(BUILD)/wxd spec/bench/run.sh
	$(BUILD)/wxd script spec/bench/reload.lua
	@$(MAKE) --no-print-directory bench-watchdog
	@$(MAKE) --no-print-directory bench-crypto
	@$(MAKE) --no-print-directory bench-pay
	@$(MAKE) --no-print-directory bench-pay-http
	@$(MAKE) --no-print-directory bench-mp
	@$(MAKE) --no-print-directory bench-ws

# WebSocket topics: publish (and order transition) to frame at the client
# with 1,000 subscribers, on one node and across two through Redis
# (spec/bench/ws_latency.lua; the client is spec/bench/ws_latency_client.c).
bench-ws: $(BUILD)/wxd $(BUILD)/bench/ws_latency_client
	WXD=$(BUILD)/wxd WS_CLIENT=$(BUILD)/bench/ws_latency_client $(BUILD)/wxd script spec/bench/ws_latency.lua

$(BUILD)/bench/ws_latency_client: spec/bench/ws_latency_client.c
	@mkdir -p $(dir $@)
	$(CC) -std=c11 -D_GNU_SOURCE $(WARN) $(CFLAGS) -o $@ $<

# /hello with the watchdog on and off in one run (spec/bench/watchdog.sh).
bench-watchdog: $(BUILD)/wxd
	WXD=$(BUILD)/wxd spec/bench/watchdog.sh

# An encrypted WeChat text message round trip, wxd next to the npm `wechat`
# middleware (spec/bench/mp.sh, spec/bench/README.md).
bench-mp: $(BUILD)/wxd deps-bench-mp
	@$(MAKE) --no-print-directory deps-bench >/dev/null
	WXD=$(BUILD)/wxd spec/bench/mp.sh

# WeChat Pay v3 notifications checked and opened per second on one core,
# wxd.pay next to Node's crypto doing the same steps (spec/bench/pay.lua).
bench-pay: $(BUILD)/wxd
	$(BUILD)/wxd script spec/bench/pay.lua

# WeChat Pay v3 notifications end to end over HTTP on 2 workers (verified,
# decrypted, checked against the order and moved to PAID), next to a Node
# peer verifying and decrypting them with its own crypto (spec/bench/pay_http.sh).
bench-pay-http: $(BUILD)/wxd
	WXD=$(BUILD)/wxd spec/bench/pay_http.sh

# AES-256-CBC decrypt and RSA-2048 verify per second, next to `openssl speed`.
# Cost of a rate-limiter check per request (spec/bench/limit.sh, spec/bench/README.md).
bench-limit: $(BUILD)/wxd
	WXD=$(BUILD)/wxd spec/bench/limit.sh

bench-crypto: $(BUILD)/wxd
	$(BUILD)/wxd script spec/bench/crypto.lua

# libFuzzer targets (spec/fuzz/*_fuzz.c) over the buffer functions of
# core/crypto.c, the XML parser of core/xml.c and the JSON decoder, encoder
# and string escaper of core/json.c and core/log.c, each run for
# FUZZ_SECONDS from its seed corpus (spec/fuzz/corpus/<target>/; new
# inputs go to build/fuzz/corpus-<target>).
# Not part of `make test`.
FUZZ_SECONDS ?= 60
FUZZ_CC      ?= clang
FUZZ_TARGETS := $(patsubst spec/fuzz/%.c,build/fuzz/%,$(wildcard spec/fuzz/*_fuzz.c))

fuzz: $(FUZZ_TARGETS)
	@for t in $(FUZZ_TARGETS); do n=$${t##*/}; mkdir -p build/fuzz/corpus-$$n; \
	  echo "fuzz: $$n for $(FUZZ_SECONDS) s"; \
	  $$t -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 -artifact_prefix=build/fuzz/$$n- \
	    build/fuzz/corpus-$$n spec/fuzz/corpus/$$n \
	    2>build/fuzz/$$n.log || { tail -n 40 build/fuzz/$$n.log; exit 1; }; \
	  grep -E '^(Done|stat::number_of_executed_units)' build/fuzz/$$n.log; done

build/fuzz/%: spec/fuzz/%.c core/crypto.c core/rsa.c core/ecdsa.c core/wxmsg.c core/query.c core/buf.c core/xml.c core/crypto.h | deps-fuzz
	@mkdir -p $(dir $@)
	$(FUZZ_CC) -std=c11 -D_GNU_SOURCE $(WARN) -g -O1 -fsanitize=fuzzer,address,undefined \
	  -I$(LUAJIT_INC) -Icore -o $@ $< core/crypto.c core/rsa.c core/ecdsa.c core/wxmsg.c core/query.c core/buf.c core/xml.c $(LIBDIR)/libluajit-5.1.a -lcrypto -lexpat -ldl -lm

# An explicit rule wins over the pattern above: xml_fuzz links expat instead.
build/fuzz/xml_fuzz: spec/fuzz/xml_fuzz.c core/xml.c core/xml.h core/buf.c core/buf.h | deps-fuzz
	@mkdir -p $(dir $@)
	$(FUZZ_CC) -std=c11 -D_GNU_SOURCE $(WARN) -g -O1 -fsanitize=fuzzer,address,undefined \
	  -I$(LUAJIT_INC) -Icore -o $@ $< core/xml.c core/buf.c $(LIBDIR)/libluajit-5.1.a -lexpat -ldl -lm

build/fuzz/json_fuzz: spec/fuzz/json_fuzz.c core/json.c core/json.h core/log.c core/log.h core/logtext.c core/logtext.h | deps-fuzz
	@mkdir -p $(dir $@)
	$(FUZZ_CC) -std=c11 -D_GNU_SOURCE $(WARN) -g -O1 -fsanitize=fuzzer,address,undefined \
	  -I$(LUAJIT_INC) -Icore -o $@ $< core/json.c core/log.c core/logtext.c $(LIBDIR)/libluajit-5.1.a -lpthread -ldl -lm

clean:
	rm -rf build
