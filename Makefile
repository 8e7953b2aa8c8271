# wxd — see README.md. `make` builds build/wxd; `make run`, `make test`,
# `make asan`, `make bench`, `make deps`.

CC       ?= cc
MULTIARCH := $(shell $(CC) -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
LIBDIR   := /usr/lib/$(MULTIARCH)
LLHTTP_SRC := /usr/share/llhttp
LLHTTP_INC := /usr/share/include/llhttp
LUAJIT_INC := /usr/include/luajit-2.1

# Debian packages the build, the tests and the benchmarks need.
DEB_BUILD := build-essential pkg-config libluajit2-5.1-dev luajit2 libuv1-dev node-llhttp \
             libssl-dev libhiredis-dev lua-cjson-dev libexpat1-dev
DEB_TEST  := lua-busted lua-socket redis-server curl openssl
DEB_BENCH := wrk nginx libnginx-mod-http-lua lua-cjson

WARN    := -Wall -Wextra -Werror -Wshadow
CFLAGS  ?= -O2 -g
ALL_CFLAGS := -std=c11 -D_GNU_SOURCE $(WARN) $(CFLAGS) -I$(LUAJIT_INC) -I$(LLHTTP_INC) -Icore
# LuaJIT is linked whole and its symbols exported, so that Lua C modules
# (luasocket, busted's helpers) load into wxd script.
LDLIBS  := -Wl,-E -Wl,--whole-archive $(LIBDIR)/libluajit-5.1.a -Wl,--no-whole-archive \
           $(LIBDIR)/liblua5.1-cjson.a -luv -lpthread -ldl -lm

SRC  := $(wildcard core/*.c)
HDR  := $(wildcard core/*.h)
LLHTTP_C := api.c http.c llhttp.c

BUILD ?= build
OBJ  := $(SRC:core/%.c=$(BUILD)/obj/%.o) $(LLHTTP_C:%.c=$(BUILD)/llhttp/%.o)

.PHONY: all run test asan bench deps deps-bench check-deps clean

all: $(BUILD)/wxd

$(BUILD)/wxd: $(OBJ)
	$(CC) $(ALL_CFLAGS) $(LDFLAGS) -o $@ $(OBJ) $(LDLIBS)

$(BUILD)/obj/%.o: core/%.c $(HDR) | check-deps
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) -c -o $@ $<

# llhttp is third-party C compiled in as shipped: not held to our warnings.
$(BUILD)/llhttp/%.o: $(LLHTTP_SRC)/%.c | check-deps
	@mkdir -p $(dir $@)
	$(CC) -std=c11 $(CFLAGS) -w -I$(LLHTTP_INC) -c -o $@ $<

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

deps-bench: deps
	$(call install_missing,$(DEB_BENCH))

check-deps:
	@for f in $(LUAJIT_INC)/lua.h $(LLHTTP_SRC)/llhttp.c /usr/include/uv.h $(LIBDIR)/liblua5.1-cjson.a; do \
	  [ -e $$f ] || { $(MAKE) --no-print-directory deps; break; }; done

run: $(BUILD)/wxd
	$(BUILD)/wxd run .

test: $(BUILD)/wxd
	@$(MAKE) --no-print-directory deps >/dev/null
	WXD=$(BUILD)/wxd spec/run.sh

asan:
	$(MAKE) BUILD=build/asan CFLAGS="-O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined" \
	  LDFLAGS="-fsanitize=address,undefined" build/asan/wxd
	WXD=build/asan/wxd WXD_SANITIZED=1 ASAN_OPTIONS=detect_leaks=1 spec/run.sh

bench: $(BUILD)/wxd
	@$(MAKE) --no-print-directory deps-bench >/dev/null
	WXD=$(BUILD)/wxd spec/bench/run.sh
	$(BUILD)/wxd script spec/bench/reload.lua

clean:
	rm -rf build
