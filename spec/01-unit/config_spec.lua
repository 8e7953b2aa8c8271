-- Unit specs for wxd.config: loading, env markers, secrets, validation.
-- Pure Lua: runs under `busted --lua=luajit` and inside wxd.

local config = require("wxd.config")

local tmpfiles = {}

-- Write a config file to a temporary path.
local function write(src)
    local path = os.tmpname()
    local f = assert(io.open(path, "wb"))
    f:write(src)
    f:close()
    tmpfiles[#tmpfiles + 1] = path
    return path
end

-- A getenv that sees only the given variables.
local function fake_env(vars)
    return { getenv = function(name) return vars[name] end }
end

local function load_src(src, vars)
    return config.load(write(src), fake_env(vars or {}))
end

-- Assert that validation fails with a line containing `fragment`.
local function fails(t, fragment, vars)
    local cfg, err = config.validate(t, fake_env(vars or {}))
    assert.is_nil(cfg)
    assert.is_string(err)
    assert.truthy(string.find(err, fragment, 1, true),
                  "expected\n  " .. fragment .. "\nin\n  " .. err)
    return err
end

describe("wxd.config", function()
    teardown(function()
        for _, p in ipairs(tmpfiles) do
            os.remove(p)
        end
    end)

    describe("defaults", function()
        it("are complete", function()
            assert.same({
                listen  = "127.0.0.1:8080",
                workers = "auto",
                steering = "auto",
                limits  = {
                    max_header_bytes            = 16384,
                    max_body_bytes              = 1048576,
                    max_uri_bytes               = 8192,
                    header_timeout_ms           = 10000,
                    body_timeout_ms             = 30000,
                    keepalive_timeout_ms        = 75000,
                    max_requests_per_connection = 10000,
                    shutdown_timeout_ms         = 10000,
                    send_timeout_ms             = 60000,
                    stall_timeout_ms            = 2000,
                    lua_memory_bytes            = 1073741824,
                },
                log = { level = "info", access = true },
                metrics = true,
            }, config.defaults())
        end)

        it("are a fresh table each time", function()
            local a = config.defaults()
            a.limits.max_body_bytes = 1
            a.log.level = "debug"
            assert.equal(1048576, config.defaults().limits.max_body_bytes)
            assert.equal("info", config.defaults().log.level)
        end)

        it("are what load(nil) gives", function()
            assert.same(config.defaults(), config.load(nil))
        end)

        it("fill in what a file leaves out", function()
            local cfg = assert(load_src("return { limits = { max_body_bytes = 10 } }"))
            assert.equal(10, cfg.limits.max_body_bytes)
            assert.equal(16384, cfg.limits.max_header_bytes)
            assert.equal("127.0.0.1:8080", cfg.listen)
            assert.equal("info", cfg.log.level)
        end)
    end)

    describe("load", function()
        it("loads a valid file", function()
            local cfg, err = load_src([[
                local port = 9000 + 1
                return {
                    listen = "0.0.0.0:" .. port,
                    workers = 4,
                    limits = { max_body_bytes = 2 * 1024 * 1024 },
                    log = { level = "debug", access = false },
                    mp = { appid = "wx123", secret = env("WXD_MP_SECRET") },
                    redis = { url = "redis://127.0.0.1:6379/0", timeout = 200 },
                }
            ]], { WXD_MP_SECRET = "s3cr3t" })
            assert.is_nil(err)
            assert.equal("0.0.0.0:9001", cfg.listen)
            assert.equal(4, cfg.workers)
            assert.equal(2097152, cfg.limits.max_body_bytes)
            assert.same({ level = "debug", access = false }, cfg.log)
            assert.same({ appid = "wx123", secret = "s3cr3t" }, cfg.mp)
            assert.same({ url = "redis://127.0.0.1:6379/0", timeout = 200 }, cfg.redis)
        end)

        it("refuses a path that does not exist", function()
            local path = os.tmpname()
            os.remove(path)
            local cfg, err = config.load(path)
            assert.is_nil(cfg)
            assert.truthy(string.find(err, path, 1, true), err)
        end)

        it("reports syntax errors", function()
            local cfg, err = load_src("return {")
            assert.is_nil(cfg)
            assert.is_string(err)
        end)

        it("reports runtime errors of the file", function()
            local cfg, err = load_src("error('nope')")
            assert.is_nil(cfg)
            assert.truthy(string.find(err, "nope", 1, true))
        end)

        it("requires the file to return a table", function()
            local cfg, err = load_src("return 42")
            assert.is_nil(cfg)
            assert.equal("config file must return a table, got 42", err)
        end)

        it("says a config file is sandboxed when it requires or loads a file", function()
            for _, src in ipairs({ 'local x = require("os")', 'dofile("x.lua")', 'loadfile("x.lua")' }) do
                local cfg, err = load_src(src .. "\nreturn {}")
                assert.is_nil(cfg)
                assert.matches(':1: %a+%("[%w.]+"%): config files are sandboxed', err)
            end
        end)

        it("runs the file in a sandbox", function()
            local cfg, err = load_src([[
                return {
                    app = {
                        has_io = io ~= nil,
                        has_os_execute = os.execute ~= nil,
                        has_getenv = os.getenv ~= nil,
                        has_string = string.format("%d", 1) == "1",
                        n = select("#", 1, 2),
                    },
                }
            ]])
            assert.is_nil(err)
            assert.same({
                has_io = false, has_os_execute = false,
                has_getenv = true, has_string = true, n = 2,
            }, cfg.app)
        end)

        it("does not let the file alter the server's own modules", function()
            local cfg = assert(load_src("string.upper = nil; x = 1; return {}"))
            assert.is_table(cfg)
            assert.is_function(string.upper)
            assert.is_nil(rawget(_G, "x"))
        end)

        it("uses the real os.getenv by default", function()
            local cfg, err = config.load(write('return { app = { path = env("PATH") } }'))
            assert.is_nil(err)
            assert.equal(os.getenv("PATH"), cfg.app.path)
        end)
    end)

    describe("env markers", function()
        it("are resolved at any depth", function()
            local cfg = assert(config.validate({
                mp = { secret = config.env("WXD_MP_SECRET"), deep = { aes_key = config.env("WXD_AES") } },
                pay = { list = { config.env("WXD_ONE") } },
            }, fake_env({ WXD_MP_SECRET = "a", WXD_AES = "b", WXD_ONE = "c" })))
            assert.equal("a", cfg.mp.secret)
            assert.equal("b", cfg.mp.deep.aes_key)
            assert.equal("c", cfg.pay.list[1])
        end)

        it("use the default when the variable is unset or empty", function()
            local cfg = assert(config.validate({
                mp = { secret = config.env("WXD_MP_SECRET", "dev-only") },
                listen = config.env("WXD_LISTEN", "127.0.0.1:9999"),
                workers = config.env("WXD_WORKERS", 2),
            }, fake_env({ WXD_MP_SECRET = "" })))
            assert.equal("dev-only", cfg.mp.secret)
            assert.equal("127.0.0.1:9999", cfg.listen)
            assert.equal(2, cfg.workers)
        end)

        it("fail when the variable is missing and there is no default", function()
            local err = fails({ mp = { secret = config.env("WXD_X") } },
                              "config.mp.secret: environment variable WXD_X is not set")
            assert.equal("config.mp.secret: environment variable WXD_X is not set", err)
        end)

        it("report a missing variable once, not also as a type error", function()
            local err = fails({ listen = config.env("WXD_LISTEN") },
                              "config.listen: environment variable WXD_LISTEN is not set")
            assert.equal("config.listen: environment variable WXD_LISTEN is not set", err)
        end)

        it("coerce strings from the environment for typed keys", function()
            local cfg = assert(config.validate({
                workers = config.env("W"),
                limits = { max_body_bytes = config.env("B") },
                log = { access = config.env("A") },
            }, fake_env({ W = "8", B = "100", A = "false" })))
            assert.equal(8, cfg.workers)
            assert.equal(100, cfg.limits.max_body_bytes)
            assert.is_false(cfg.log.access)
            fails({ limits = { max_body_bytes = config.env("B") } },
                  'config.limits.max_body_bytes: expected a positive integer, got "lots"', { B = "lots" })
        end)

        it("are read again on each validation (the caller's table is not changed)", function()
            local t = { mp = { secret = config.env("S") } }
            assert.equal("one", config.validate(t, fake_env({ S = "one" })).mp.secret)
            assert.equal("two", config.validate(t, fake_env({ S = "two" })).mp.secret)
            assert.is_true(config.is_env(t.mp.secret))
        end)

        it("env() raises on a bad name or default", function()
            assert.has_error(function() config.env("") end)
            assert.has_error(function() config.env("1X") end)
            assert.has_error(function() config.env(nil) end)
            assert.has_error(function() config.env("X", {}) end)
            local cfg, err = load_src('return { mp = { secret = env("BAD NAME") } }')
            assert.is_nil(cfg)
            assert.truthy(string.find(err, "env()", 1, true), err)
        end)
    end)

    describe("secrets", function()
        it("are refused as literal strings, naming the key", function()
            local err = fails({ mp = { secret = "abc" } },
                              'config.mp.secret: secrets must come from the environment; use env("WXD_MP_SECRET")')
            assert.equal('config.mp.secret: secrets must come from the environment; use env("WXD_MP_SECRET")', err)
        end)

        it("are recognised by name, case-insensitively, at any depth", function()
            for _, key in ipairs({ "secret", "app_secret", "Password", "passwd", "token", "verify_token",
                                   "aes_key", "encoding_aes_key", "API_KEY", "private_key", "apiv3_key" }) do
                fails({ pay = { nested = { [key] = "literal" } } }, "config.pay.nested." .. key .. ": secrets must")
            end
            fails({ mp = { accounts = { { token = "t" } } } }, "config.mp.accounts[1].token: secrets must")
        end)

        it("in a file are refused too", function()
            local cfg, err = load_src('return { mp = { token = "abc" } }')
            assert.is_nil(cfg)
            assert.truthy(string.find(err, "config.mp.token: secrets must come from the environment", 1, true))
        end)

        it("allow references to secrets and non-string values", function()
            local cfg, err = config.validate({
                pay = {
                    private_key_file = "/etc/wxd/apiclient_key.pem",
                    private_key_path = "/etc/wxd/key.pem",
                    token_url = "https://api.weixin.qq.com/cgi-bin/token",
                    token_ttl = 7200,
                },
                token = { refresh_ahead_s = 300 },
                mp = { appid = "wx1", secret = config.env("S") },
            }, fake_env({ S = "x" }))
            assert.is_nil(err)
            assert.equal("/etc/wxd/apiclient_key.pem", cfg.pay.private_key_file)
            assert.equal(300, cfg.token.refresh_ahead_s)
        end)
    end)

    describe("validation", function()
        it("refuses unknown top-level keys, suggesting close ones", function()
            assert.equal('config.lisen: unknown key (did you mean "listen"?)', fails({ lisen = "x" }, "config.lisen"))
            fails({ wokrers = 2 }, 'config.wokrers: unknown key (did you mean "workers"?)')
            fails({ limit = {} }, 'config.limit: unknown key (did you mean "limits"?)')
            local err = fails({ frobnicate = 1 }, "config.frobnicate: unknown key")
            assert.equal("config.frobnicate: unknown key", err)
        end)

        it("accepts the free-form sections as tables only", function()
            for _, k in ipairs({ "mp", "pay", "miniprogram", "token", "app" }) do
                local cfg = assert(config.validate({ [k] = { anything = { 1, 2 } } }))
                assert.same({ anything = { 1, 2 } }, cfg[k])
                fails({ [k] = "x" }, "config." .. k .. ': expected a table, got "x"')
            end
        end)

        it("checks listen", function()
            for _, ok in ipairs({ "127.0.0.1:8080", "0.0.0.0:1", "localhost:65535", "[::1]:8080", "[::]:80" }) do
                assert.equal(ok, assert(config.validate({ listen = ok })).listen)
            end
            fails({ listen = "127.0.0.1:0" }, 'config.listen: port must be in 1..65535, got "127.0.0.1:0"')
            fails({ listen = "127.0.0.1:65536" }, "config.listen: port must be in 1..65535")
            fails({ listen = "8080" }, 'config.listen: expected "HOST:PORT"')
            fails({ listen = ":8080" }, 'config.listen: expected "HOST:PORT"')
            fails({ listen = "::1:8080" }, 'config.listen: expected "HOST:PORT"')
            fails({ listen = "host:port" }, 'config.listen: expected "HOST:PORT"')
            fails({ listen = 8080 }, 'config.listen: expected "HOST:PORT"')
        end)

        it("checks workers", function()
            assert.equal("auto", assert(config.validate({ workers = "auto" })).workers)
            assert.equal(1, assert(config.validate({ workers = 1 })).workers)
            fails({ workers = 0 }, 'config.workers: expected a positive integer or "auto", got 0')
            fails({ workers = 1.5 }, "config.workers: expected a positive integer")
            fails({ workers = "many" }, 'config.workers: expected a positive integer or "auto", got "many"')
            fails({ workers = "4" }, 'got "4"') -- a literal string is not coerced
        end)

        it("checks every limit", function()
            for _, k in ipairs({ "max_header_bytes", "max_body_bytes", "max_uri_bytes", "header_timeout_ms",
                                 "body_timeout_ms", "keepalive_timeout_ms", "max_requests_per_connection",
                                 "shutdown_timeout_ms", "stall_timeout_ms", "lua_memory_bytes" }) do
                assert.equal(5, assert(config.validate({ limits = { [k] = 5 } })).limits[k])
                assert.equal("config.limits." .. k .. ': expected a positive integer, got "lots"',
                             fails({ limits = { [k] = "lots" } }, "config.limits." .. k))
                fails({ limits = { [k] = 0 } }, "config.limits." .. k .. ": expected a positive integer, got 0")
                fails({ limits = { [k] = -1 } }, "got -1")
                fails({ limits = { [k] = 1.5 } }, "got 1.5")
                fails({ limits = { [k] = math.huge } }, "expected a positive integer")
                fails({ limits = { [k] = true } }, "got true")
            end
        end)

        it("refuses unknown limits, naming config.limits.<key>", function()
            fails({ limits = { max_body_byte = 1 } }, 'config.limits.max_body_byte: unknown key (did you mean "max_body_bytes"?)')
            fails({ limits = { nope = 1 } }, "config.limits.nope: unknown key")
            fails({ limits = 5 }, "config.limits: expected a table, got 5")
        end)

        it("checks log", function()
            for _, level in ipairs({ "debug", "info", "warn", "error" }) do
                assert.equal(level, assert(config.validate({ log = { level = level } })).log.level)
            end
            fails({ log = { level = "trace" } },
                  'config.log.level: expected one of "debug", "info", "warn", "error", got "trace"')
            fails({ log = { access = "yes" } }, 'config.log.access: expected true or false, got "yes"')
            fails({ log = { acess = true } }, 'config.log.acess: unknown key (did you mean "access"?)')
            fails({ log = "info" }, 'config.log: expected a table, got "info"')
        end)

        it("reports every error, one per line, in a stable order", function()
            local _, err = config.validate({ workers = 0, lisen = "x", limits = { max_body_bytes = "x" } })
            assert.equal(table.concat({
                'config.limits.max_body_bytes: expected a positive integer, got "x"',
                'config.lisen: unknown key (did you mean "listen"?)',
                'config.workers: expected a positive integer or "auto", got 0',
            }, "\n"), err)
        end)

        it("refuses a table that contains itself", function()
            local t = {}
            t.self = t
            fails({ app = t }, "config.app.self: the table contains itself")
        end)

        it("allows one table shared by two sections", function()
            local http = { timeout_ms = 5000 }
            local cfg = assert(config.validate({ mp = { http = http }, pay = { http = http } }))
            assert.equal(5000, cfg.pay.http.timeout_ms)
        end)

        it("refuses a config that is not a table", function()
            local cfg, err = config.validate("x")
            assert.is_nil(cfg)
            assert.is_string(err)
        end)
    end)
end)

describe("wxd.config: redis and store", function()
    it("accepts a URL or a table for redis", function()
        local cfg = assert(config.validate({ redis = "redis://127.0.0.1:6379/0" }))
        assert.same({ url = "redis://127.0.0.1:6379/0" }, cfg.redis)
        cfg = assert(config.validate({ redis = { url = "unix:///run/redis.sock?db=2", timeout = 100,
                                                 connect_timeout = 50 } }))
        assert.same({ url = "unix:///run/redis.sock?db=2", timeout = 100, connect_timeout = 50 }, cfg.redis)
        -- Secrets from the environment.
        cfg = assert(config.validate({ redis = config.env("REDIS_URL") }, fake_env({ REDIS_URL = "redis://:pw@h:1/0" })))
        assert.same({ url = "redis://:pw@h:1/0" }, cfg.redis)
        cfg = assert(config.validate({ redis = { url = "redis://h", user = "app", password = config.env("REDIS_PW") } },
            fake_env({ REDIS_PW = "pw" })))
        assert.equal("pw", cfg.redis.password)
        cfg = assert(config.validate({ redis = { url = "redis://h", timeout = config.env("REDIS_TIMEOUT") } },
            fake_env({ REDIS_TIMEOUT = "250" })))
        assert.equal(250, cfg.redis.timeout)
    end)

    it("names the key of a bad redis setting, and never shows a password", function()
        fails({ redis = 6379 }, "config.redis: expected a URL")
        fails({ redis = "http://h:1" }, 'config.redis: expected "redis://')
        fails({ redis = "redis://h:99999" }, "config.redis: the port of a Redis URL is 1..65535")
        fails({ redis = { url = "redis://h/x" } }, "config.redis.url: bad database number")
        fails({ redis = { url = 1 } }, "config.redis.url: expected a URL")
        fails({ redis = {} }, "config.redis.url: missing")
        fails({ redis = { url = "redis://h", timeout = 0 } }, "config.redis.timeout: expected a positive integer")
        fails({ redis = { url = "redis://h", connect_timeout = 2e9 } }, "config.redis.connect_timeout: at most 1e9 ms")
        fails({ redis = { url = "redis://h", tiemout = 5 } }, 'config.redis.tiemout: unknown key (did you mean "timeout"?)')
        fails({ redis = { url = "redis://h", user = "u", password = config.env("P") } }, "config.redis.password",
            {})
        fails({ redis = { url = "redis://h", user = "u" } }, "config.redis.user: a user needs a password")
        local err = fails({ redis = "redis://:hunter2@h:1/0" },
          "config.redis: a password in the URL must come from the environment")
        assert.falsy(err:find("hunter2", 1, true))
        err = fails({ redis = { url = "redis://u:hunter2@h:1/0" } }, "config.redis.url: a password in the URL")
        assert.falsy(err:find("hunter2", 1, true))
        err = fails({ redis = { url = "redis://h", password = "hunter2" } }, "secrets must come from the environment")
        assert.falsy(err:find("hunter2", 1, true))
    end)

    it("checks store", function()
        local cfg = assert(config.validate({ store = { backend = "memory", shdict = "mine" } }))
        assert.same({ backend = "memory", shdict = "mine" }, cfg.store)
        cfg = assert(config.validate({ redis = "redis://h", store = { backend = "redis", prefix = "app:" } }))
        assert.same({ backend = "redis", prefix = "app:" }, cfg.store)
        fails({ store = "redis" }, 'config.store: expected a table, got "redis"')
        fails({ store = { backend = "mongo" } }, 'config.store.backend: expected "memory" or "redis", got "mongo"')
        fails({ store = { backend = "redis" } }, "config.store.backend: the redis backend needs redis =")
        fails({ store = { shdict = "Bad-Name" } }, "config.store.shdict: expected the name of a shared dictionary")
        fails({ store = { prefix = 1 } }, "config.store.prefix: expected a string")
        fails({ store = { backnd = "memory" } }, 'config.store.backnd: unknown key (did you mean "backend"?)')
    end)
end)

-- The core (core/config.c) keeps no default of its own: it reads every
-- value from the validated table, where config.defaults() fills in what a
-- file leaves out. So the two cannot drift, provided the core reads every
-- default and nothing more: `wxd check` on an app without config.lua must
-- pass, and must fail naming the key when any one default is taken away
-- (a core that still read a fallback of its own, or ignored the key, would
-- pass). Runs inside wxd (spec/run.sh sets WXD and WXD_LUA_DIR).
describe("defaults shared with the core", function()
    local WXD, LUA_DIR = os.getenv("WXD"), os.getenv("WXD_LUA_DIR")
    if not (WXD and LUA_DIR) then
        pending("needs WXD and WXD_LUA_DIR (spec/run.sh)")
        return
    end

    local function sh(cmd)
        local p = assert(io.popen(cmd .. " 2>&1; echo \"rc=$?\""))
        local out = p:read("*a")
        p:close()
        local code = tonumber(out:match("rc=(%d+)%s*$"))
        return out:gsub("rc=%d+%s*$", ""), code
    end

    local function slurp(path)
        local f = assert(io.open(path, "rb"))
        local s = f:read("*a")
        f:close()
        return s
    end

    local function spit(path, s)
        local f = assert(io.open(path, "wb"))
        f:write(s)
        f:close()
    end

    -- Every leaf of config.defaults(), as "a" or "a.b".
    local function leaves(t, prefix, out)
        out = out or {}
        for k, v in pairs(t) do
            local path = prefix and prefix .. "." .. k or k
            if type(v) == "table" then
                leaves(v, path, out)
            else
                out[#out + 1] = path
            end
        end
        table.sort(out)
        return out
    end

    local dir, real_config
    setup(function()
        dir = os.tmpname()
        os.remove(dir)
        assert(os.execute("mkdir -p " .. dir .. "/app && cp -R " .. LUA_DIR .. " " .. dir .. "/lua"))
        spit(dir .. "/app/app.lua", 'return require("wxd.app").new()\n')
        real_config = slurp(LUA_DIR .. "/wxd/config.lua")
    end)
    teardown(function()
        if dir then os.execute("rm -rf " .. dir) end
    end)

    -- wxd check with the library's config.defaults() less one key (nil: all).
    local function check_without(key)
        local src = real_config
        if key then
            local a, b = key:match("^([^.]+)%.?(.*)$")
            local drop = b == "" and "d." .. a .. " = nil" or "d." .. a .. "." .. b .. " = nil"
            local cut = assert(src:find("\nreturn _M%s*$"), "config.lua ends with return _M")
            src = src:sub(1, cut) .. "local real_defaults = _M.defaults\n"
                .. "function _M.defaults() local d = real_defaults(); " .. drop .. "; return d end\n"
                .. "return _M\n"
        end
        spit(dir .. "/lua/wxd/config.lua", src)
        return sh("WXD_LUA_DIR=" .. dir .. "/lua " .. WXD .. " check " .. dir .. "/app")
    end

    it("the core finds every key it reads among config.defaults()", function()
        local out, code = check_without(nil)
        assert.equal(0, code, out)
    end)

    for _, key in ipairs(leaves(config.defaults())) do
        it("the core reads config." .. key .. " from config.defaults()", function()
            local out, code = check_without(key)
            assert.equal(1, code, out)
            assert.truthy(out:find("config." .. key .. ": missing", 1, true), out)
        end)
    end
end)
