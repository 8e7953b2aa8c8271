-- wxd.redis in a script: replies, sharing one connection, pipelines,
-- scripts, pub/sub, AUTH, SELECT, timeouts, Redis restarting or missing,
-- and every bad input. Uses the redis-server of spec/run.sh, and extra
-- servers (helpers.redis_server) for the specs that restart or configure one.
local wxd = require "wxd"
local redis = require "wxd.redis"
local cjson = require "cjson"
local H = require "helpers"

local URL = H.redis_url()
local PORT = tonumber(URL:match(":(%d+)/"))

-- The URL of database n of the test server.
local function db(n) return (URL:gsub("/%d+$", "/" .. n)) end

local function elapsed_ms(fn)
  local t0 = wxd.monotonic_ms()
  local a, b, c = fn()
  return wxd.monotonic_ms() - t0, a, b, c
end

-- The clients connected to a server, from CLIENT LIST, as a list of tables.
local function clients(r)
  local out = {}
  for line in assert(r:client("LIST")):gmatch("[^\n]+") do
    local c = {}
    for k, v in line:gmatch("(%S+)=(%S*)") do c[k] = v end
    out[#out + 1] = c
  end
  return out
end

describe("wxd.redis", function()
  local r
  setup(function() r = redis.new(URL) end)

  describe("replies", function()
    it("maps each reply type", function()
      assert.equal("OK", r:set("t:str", "v"))              -- status
      assert.equal("PONG", r:ping())
      assert.equal("v", r:get("t:str"))                    -- bulk
      assert.equal(1, r:del("t:str"))                      -- integer
      assert.equal(redis.null, r:get("t:str"))             -- nil bulk
      assert.equal(cjson.null, redis.null)
      r:del("t:list")
      assert.equal(3, r:rpush("t:list", "a", "", "c"))
      assert.same({ "a", "", "c" }, r:lrange("t:list", 0, -1)) -- array
      assert.same({}, r:lrange("t:none", 0, -1))           -- empty array
      r:hset("t:h", "f", "1")
      assert.same({ "f", "1" }, r:hgetall("t:h"))
      assert.same({ "v1", redis.null }, (function() r:set("t:m1", "v1") return r:mget("t:m1", "t:m2") end)())
      local binary = "a\0b\r\n\255"
      r:set("t:bin", binary)
      assert.equal(binary, r:get("t:bin"))
    end)

    it("returns an error reply as nil and the server's message", function()
      r:set("t:str", "v")
      local v, err = r:lpush("t:str", "x")
      assert.is_nil(v)
      assert.matches("^WRONGTYPE ", err)
      v, err = r:call("NOSUCHCOMMAND", "x")
      assert.is_nil(v)
      assert.matches("^ERR unknown command", err)
      v, err = r:incr("t:str")
      assert.is_nil(v)
      assert.matches("^ERR ", err)
    end)

    it("nests arrays and errors inside them", function()
      local v = r:eval("return { 1, 'two', { 3, { 'four' } }, redis.error_reply('MYERR inner') }")
      assert.equal(1, v[1])
      assert.equal("two", v[2])
      assert.same({ 3, { "four" } }, v[3])
      assert.same({ err = "MYERR inner" }, v[4])
    end)

    it("writes numbers exactly", function()
      assert.equal("OK", r:set("t:n", 2 ^ 53))
      assert.equal("9007199254740992", r:get("t:n"))
      r:set("t:n", 1e15)
      assert.equal(1000000000000001, r:incr("t:n"))
      r:set("t:n", 0.1)
      assert.equal("0.10000000000000001", r:get("t:n"))
      assert.equal(-5, r:incrby("t:neg", -5) + 0 * r:del("t:neg"))
    end)
  end)

  describe("one connection per worker and URL", function()
    it("serves 1000 concurrent coroutines with exact results", function()
      local c = redis.new(db(7))
      assert(c:del("t:count"))
      local done, bad = 0, 0
      for i = 1, 1000 do
        wxd.timer.after(0, function()
          local n = c:incr("t:count")
          local echo = c:echo("e" .. i) -- replies matched to their own command
          if type(n) ~= "number" or echo ~= "e" .. i then bad = bad + 1 end
          done = done + 1
        end)
      end
      H.wait_until(function() return done == 1000 end, 20, "1000 coroutines")
      assert.equal(0, bad)
      assert.equal("1000", c:get("t:count"))
      local in_db7 = 0
      for _, cl in ipairs(clients(c)) do
        if cl.db == "7" then in_db7 = in_db7 + 1 end
      end
      assert.equal(1, in_db7)
      -- A second client of the same URL shares it.
      local c2 = redis.new(db(7), { timeout = 100 })
      assert.equal("PONG", c2:ping())
      in_db7 = 0
      for _, cl in ipairs(clients(c)) do
        if cl.db == "7" then in_db7 = in_db7 + 1 end
      end
      assert.equal(1, in_db7)
      assert.equal("ready", c2:status().state)
    end)

    it("resolves names, trying every address", function()
      local c = redis.new("redis://localhost:" .. PORT .. "/0")
      assert.equal("PONG", c:ping())
    end)

    it("connects to a unix socket, with a database", function()
      local sock = os.getenv("WXD_TEST_REDIS_SOCK")
      assert.truthy(sock, "WXD_TEST_REDIS_SOCK")
      local c = redis.new("unix://" .. sock .. "?db=3")
      assert.equal("OK", c:set("t:unix", "u"))
      local c3 = redis.new(db(3))
      assert.equal("u", c3:get("t:unix"))
    end)
  end)

  describe("SELECT from the URL", function()
    it("keeps databases apart", function()
      local a, b = redis.new(db(1)), redis.new(db(2))
      a:set("t:db", "one")
      b:set("t:db", "two")
      assert.equal("one", a:get("t:db"))
      assert.equal("two", b:get("t:db"))
    end)

    it("fails a database the server does not have", function()
      local c = redis.new(db(999))
      local v, err, detail = c:ping()
      assert.is_nil(v)
      assert.equal("connect", err)
      assert.matches("SELECT 999", detail)
    end)
  end)

  describe("pipelines and transactions", function()
    it("sends several commands at once and returns every result", function()
      r:del("t:p")
      local res = assert(r:pipeline({
        { "SET", "t:p", "1" }, { "INCR", "t:p" }, { "GET", "t:p" }, { "LPUSH", "t:p", "x" }, { "GET", "t:nope" },
      }))
      assert.equal("OK", res[1])
      assert.equal(2, res[2])
      assert.equal("2", res[3])
      assert.matches("^WRONGTYPE", res[4].err)
      assert.equal(redis.null, res[5])
    end)

    it("runs a transaction", function()
      r:del("t:tx")
      local res = assert(r:transaction({ { "INCR", "t:tx" }, { "INCRBY", "t:tx", 10 } }))
      assert.same({ 1, 11 }, res)
      local v, err = r:transaction({ { "INCR", "t:tx" }, { "NOSUCHCOMMAND" } })
      assert.is_nil(v)
      assert.matches("^EXECABORT", err)
      assert.equal("11", r:get("t:tx"))
    end)
  end)

  describe("scripts", function()
    it("uses EVALSHA, and EVAL when the server lost the script", function()
      local script = "return { KEYS[1], ARGV[1], ARGV[2] } -- " .. wxd.now()
      local function evalsha_calls()
        local info = r:info("commandstats")
        return tonumber(info:match("cmdstat_evalsha:calls=(%d+)")) or 0
      end
      assert.same({ "k", "a", "2" }, r:eval(script, { "k" }, { "a", 2 }))
      local before = evalsha_calls()
      assert.same({ "k", "b", "3" }, r:eval(script, { "k" }, { "b", 3 }))
      assert.equal(before + 1, evalsha_calls())
      assert.equal("OK", r:script("FLUSH"))
      assert.same({ "k", "c", "4" }, r:eval(script, { "k" }, { "c", 4 }))
      assert.equal(7, r:eval("return 7"))
      local v, err = r:eval("return redis.call('NOSUCH')")
      assert.is_nil(v)
      assert.matches("Unknown Redis command", err)
    end)
  end)

  describe("pub/sub", function()
    it("delivers messages to a callback in its own coroutine", function()
      local got = {}
      local h = r:subscribe("t:chan", function(msg, channel)
        wxd.sleep(1) -- callbacks may wait
        got[#got + 1] = channel .. "=" .. msg
      end)
      assert.is_true(h:active())
      local pgot = {}
      local ph = r:psubscribe("t:p.*", function(msg, channel, pattern) pgot[#pgot + 1] = { msg, channel, pattern } end)
      H.wait_until(function() return r:publish("t:chan", "hello") == 1 end, 5, "the subscription")
      H.wait_until(function() return #got >= 1 end, 5, "a message")
      assert.equal("t:chan=hello", got[1])
      H.wait_until(function() return r:publish("t:p.x", "pat") == 1 end, 5, "the pattern subscription")
      H.wait_until(function() return #pgot >= 1 end, 5, "a pattern message")
      assert.same({ "pat", "t:p.x", "t:p.*" }, pgot[1])
      assert.equal(2, r:status().subscriber.subscriptions)
      h:unsubscribe()
      h:unsubscribe() -- idempotent
      assert.is_false(h:active())
      ph:unsubscribe()
      H.wait_until(function() return r:publish("t:chan", "again") == 0 end, 5, "the unsubscription")
      wxd.sleep(20)
      assert.equal(1, #got)
    end)

    it("runs every subscription of a channel; a callback may unsubscribe another", function()
      local a, b = 0, 0
      local hb
      local ha = r:subscribe("t:multi", function()
        a = a + 1
        if hb then hb:unsubscribe() end
      end)
      hb = r:subscribe("t:multi", function() b = b + 1 end)
      H.wait_until(function() return r:publish("t:multi", "1") >= 1 end, 5, "the subscription")
      H.wait_until(function() return a >= 1 end, 5, "the first callback")
      r:publish("t:multi", "2")
      H.wait_until(function() return a >= 2 end, 5, "the second message")
      assert.is_true(b <= 1)
      ha:unsubscribe()
    end)

    it("logs an error raised by a callback and keeps delivering", function()
      -- In a script of its own, so that its log (stderr) can be read.
      local dir = H.tmpdir()
      H.write_file(dir .. "/s.lua", string.format([[
        local wxd, redis = require "wxd", require "wxd.redis"
        local r, n = redis.new(%q), 0
        local h = r:subscribe("t:err", function(msg)
          n = n + 1
          error("subscriber boom " .. msg)
        end)
        local deadline = wxd.monotonic_ms() + 5000
        while r:publish("t:err", "x") ~= 1 and wxd.monotonic_ms() < deadline do wxd.sleep(20) end
        r:publish("t:err", "y")
        while n < 2 and wxd.monotonic_ms() < deadline do wxd.sleep(20) end
        h:unsubscribe()
        io.stdout:write("delivered ", n, "\n")
      ]], URL))
      local out, code = H.sh(H.WXD .. " script " .. dir .. "/s.lua")
      os.execute("rm -rf " .. dir)
      assert.equal(0, code, out)
      assert.matches("delivered [23]", out)
      local logged = {}
      for line in out:gmatch("[^\n]+") do
        local e = line:sub(1, 1) == "{" and cjson.decode(line)
        if e and e.msg == "redis subscriber error" then logged[#logged + 1] = e end
      end
      assert.is_true(#logged >= 2, out)
      assert.equal("error", logged[1].level)
      assert.matches("subscriber boom x", logged[1].error, 1, true)
      assert.matches("subscriber boom y", logged[2].error, 1, true)
      assert.matches("stack traceback", logged[1].error, 1, true)
    end)
  end)

  describe("AUTH", function()
    local srv
    setup(function() srv = H.redis_server({ args = "--requirepass s3cret" }) end)
    teardown(function() srv:cleanup() end)

    it("authenticates with the password of the URL", function()
      local c = redis.new("redis://:s3cret@127.0.0.1:" .. srv.port .. "/0")
      assert.equal("PONG", c:ping())
      assert.equal("PONG", redis.new({ url = srv.url, password = "s3cret" }):ping())
    end)

    it("fails with a wrong password, and never shows it", function()
      -- Connections Redis accepted so far (each redis-cli call is one).
      local function connections()
        local info = H.sh("redis-cli -p " .. srv.port .. " -a s3cret --no-auth-warning info stats")
        return tonumber(info:match("total_connections_received:(%d+)"))
      end
      local before = connections()
      local c = redis.new("redis://:wrong-pw@127.0.0.1:" .. srv.port .. "/0")
      local v, err, detail = c:ping()
      local failed_at = wxd.monotonic_ms()
      -- Until the backoff (100 ms) ends: at once, with the same error, and
      -- without a new connection. Counted, not timed: on a loaded machine
      -- the second ping may come after the backoff, and may then connect.
      local v2, err2 = c:ping()
      local late = wxd.monotonic_ms() - failed_at >= 90
      local made = connections() - before - 1 -- the second redis-cli's own
      assert.is_nil(v)
      assert.equal("auth", err)
      assert.not_matches("wrong%-pw", detail)
      assert.matches(":***@", detail, 1, true)
      assert.not_matches("wrong%-pw", tostring(c))
      assert.is_nil(v2)
      assert.equal("auth", err2)
      assert.is_true(made == 1 or (late and made == 2), made .. " connections, second ping late: " .. tostring(late))
    end)

    it("gets NOAUTH without a password", function()
      local v, err = redis.new(srv.url):ping()
      assert.is_nil(v)
      assert.matches("^NOAUTH", err)
    end)

    it("authenticates an ACL user", function()
      local admin = redis.new("redis://:s3cret@127.0.0.1:" .. srv.port .. "/0")
      assert.equal("OK", admin:acl("SETUSER", "alice", "on", ">alice-pw", "~*", "+@all"))
      assert.equal("alice", redis.new("redis://alice:alice-pw@127.0.0.1:" .. srv.port .. "/0"):acl("WHOAMI"))
      assert.equal("alice", redis.new({ url = srv.url, user = "alice", password = "alice-pw" }):acl("WHOAMI"))
      local v, err = redis.new("redis://alice:nope@127.0.0.1:" .. srv.port .. "/0"):ping()
      assert.is_nil(v)
      assert.equal("auth", err)
      -- Percent-encoded credentials.
      assert.equal("OK", admin:acl("SETUSER", "bob", "on", ">p@ss:w/rd", "~*", "+@all"))
      assert.equal("bob", redis.new("redis://bob:p%40ss%3aw%2Frd@127.0.0.1:" .. srv.port .. "/0"):acl("WHOAMI"))
    end)
  end)

  describe("timeouts", function()
    it("returns nil, timeout and drops the late reply; the connection stays usable", function()
      local url = db(4)
      local fast = redis.new(url, { timeout = 100 })
      local slow = redis.new(url, { timeout = 3000 })
      slow:del("t:q")
      local ms, v, err = elapsed_ms(function() return fast:blpop("t:q", 1) end)
      assert.is_nil(v)
      assert.equal("timeout", err)
      -- Never early; the BLPOP's own end (1 s) would be a nil reply, not
      -- "timeout", so no upper bound is needed to tell them apart.
      assert.is_true(ms >= 90, tostring(ms))
      -- Queued behind the BLPOP, whose late reply must not be taken for this one.
      assert.equal("PONG", slow:ping())
      assert.equal("OK", slow:set("t:after", "fine"))
      assert.equal("fine", fast:get("t:after"))
      assert.equal(0, fast:status().pending)
    end)

    it("times out a pipeline as a whole", function()
      local c = redis.new(db(4), { timeout = 50 })
      local res, err = c:pipeline({ { "PING" }, { "BLPOP", "t:q2", "0.3" } })
      assert.is_nil(res)
      assert.equal("timeout", err)
      wxd.sleep(350)
      assert.equal("PONG", c:ping())
    end)
  end)

  describe("a missing or restarting Redis", function()
    it("fails fast with connect when nothing listens", function()
      local port = H.free_port()
      local c = redis.new("redis://127.0.0.1:" .. port .. "/0")
      local ms, v, err, detail = elapsed_ms(function() return c:ping() end)
      assert.is_nil(v)
      assert.equal("connect", err)
      assert.matches("127.0.0.1:" .. port, detail)
      assert.is_true(ms < 500, tostring(ms))
      assert.equal("down", c:status().state)
    end)

    it("gives up connecting after connect_timeout", function()
      -- A socket that listens but never answers: the TCP connection is
      -- made, and AUTH (part of connecting) gets no reply.
      local socket = require "socket"
      local silent = assert(socket.bind("127.0.0.1", 0))
      local _, port = silent:getsockname()
      local c = redis.new("redis://:pw@127.0.0.1:" .. port .. "/0", { connect_timeout = 100, timeout = 5000 })
      local ms, v, err, detail = elapsed_ms(function() return c:ping() end)
      silent:close()
      assert.is_nil(v)
      assert.equal("connect", err)
      assert.matches("connect timeout (100 ms)", detail, 1, true)
      assert.is_true(ms >= 90 and ms < 1000, tostring(ms))
    end)

    it("times out a command that waits for a slow connection, which goes on", function()
      local socket = require "socket"
      local silent = assert(socket.bind("127.0.0.1", 0))
      local _, port = silent:getsockname()
      local c = redis.new("redis://:pw@127.0.0.1:" .. port .. "/0", { connect_timeout = 3000, timeout = 50 })
      local ms, v, err = elapsed_ms(function() return c:ping() end)
      assert.is_nil(v)
      assert.equal("timeout", err)
      assert.is_true(ms >= 45, tostring(ms))
      assert.equal("connecting", c:status().state, "the 3 s connect timeout has not ended")
      assert.equal(0, c:status().pending)
      H.wait_until(function() return c:status().state == "down" end, 10, "the connect timeout")
      silent:close()
    end)

    it("fails a bad host name with connect", function()
      local v, err, detail = redis.new("redis://no-such-host.invalid:6379"):ping()
      assert.is_nil(v)
      assert.equal("connect", err)
      assert.matches("resolve", detail)
    end)

    it("fails in-flight commands when Redis dies, fails fast while down, then recovers", function()
      local srv = H.redis_server()
      local c = redis.new(srv.url, { timeout = 3000 })
      assert.equal("OK", c:set("k", "before"))
      local got = {}
      local subgot = {}
      c:subscribe("t:resub", function(msg) subgot[#subgot + 1] = msg end)
      H.wait_until(function() return c:publish("t:resub", "one") == 1 end, 5, "the subscription")
      wxd.timer.after(0, function() got[1], got[2] = c:blpop("t:never", 2) end)
      wxd.sleep(50)
      srv:stop()
      H.wait_until(function() return got[2] end, 2, "the blocked command to fail")
      assert.is_nil(got[1])
      assert.equal("closed", got[2])
      -- Down: an error at once, not a hang.
      for _ = 1, 3 do
        local ms, v, err = elapsed_ms(function() return c:get("k") end)
        assert.is_nil(v)
        assert.truthy(err == "connect" or err == "closed", err)
        assert.is_true(ms < 500, tostring(ms))
      end
      srv:start()
      H.wait_until(function() return c:set("k", "after") == "OK" end, 10, "the reconnection")
      assert.equal("after", c:get("k"))
      -- The subscriber connection came back and subscribed again.
      H.wait_until(function() return c:publish("t:resub", "two") == 1 end, 10, "the resubscription")
      H.wait_until(function() return subgot[#subgot] == "two" end, 5, "the message after the restart")
      srv:cleanup()
    end)
  end)

  describe("bad input", function()
    it("refuses bad URLs, naming what is wrong", function()
      local bad = {
        { nil, "expected a URL string" }, { 42, "expected a URL string" }, { "", "expected" },
        { "http://h:1", "expected \"redis://" }, { "rediss://h:1", "TLS" }, { "redis://", "expected a host" },
        { "redis://h:0", "port" }, { "redis://h:70000", "port" }, { "redis://h:1/x", "database" },
        { "redis://h:1/-1", "database" }, { "redis://pw@h:1", "credentials" }, { "redis://u:@h:1", "empty password" },
        { "redis://h 1", "spaces" }, { "unix://", "unix:///path" }, { "unix:///tmp/s?x=1", "db=N" },
        { "unix:///tmp/s?db=a", "db=N" }, { "redis://h:1/2/3", "database" },
      }
      for _, case in ipairs(bad) do
        local u, err = redis.parse_url(case[1])
        assert.is_nil(u, tostring(case[1]))
        assert.matches(case[2], err, 1, true)
        assert.has_error(function() redis.new(case[1] or {}) end)
      end
      local u = assert(redis.parse_url("redis://[::1]:7000/5"))
      assert.equal("::1", u.host)
      assert.equal(7000, u.port)
      assert.equal(5, u.db)
      assert.equal("redis://[::1]:7000/5", u.label)
      u = assert(redis.parse_url("redis://h"))
      assert.equal(6379, u.port)
      assert.equal(0, u.db)
      u = assert(redis.parse_url("unix://:pw@/run/redis.sock?db=2"))
      assert.equal("/run/redis.sock", u.path)
      assert.equal("pw", u.password)
      assert.equal("unix://:***@/run/redis.sock?db=2", u.label)
    end)

    it("refuses bad options", function()
      assert.has_error(function() redis.new(URL, { timeout = 0 }) end)
      assert.has_error(function() redis.new(URL, { timeout = "5" }) end)
      assert.has_error(function() redis.new(URL, { connect_timeout = -1 }) end)
      assert.has_error(function() redis.new(URL, 5) end)
      assert.has_error(function() redis.new({ url = URL, password = "" }) end)
      assert.has_error(function() redis.new({ url = URL, user = "u" }) end)
      assert.has_error(function() redis.new(true) end)
    end)

    it("raises on arguments that are not strings or numbers", function()
      assert.has_error(function() r:set("k", {}) end, "wxd.redis: command: arguments must be strings or numbers, got table")
      assert.has_error(function() r:set("k", true) end)
      assert.has_error(function() r:set("k", nil, "x") end)
      assert.has_error(function() r:call() end)
      assert.has_error(function() r:call("") end)
      assert.has_error(function() r:call(42) end)
      assert.has_error(function() r:pipeline({}) end)
      assert.has_error(function() r:pipeline("PING") end)
      assert.has_error(function() r:pipeline({ "PING" }) end)
      assert.has_error(function() r:pipeline({ { "SET", "k", {} } }) end)
      assert.has_error(function() r:pipeline({ { "PING" }, {} }) end)
      assert.has_error(function() r:transaction({}) end)
      assert.has_error(function() r:eval(42) end)
      assert.has_error(function() r:eval("return 1", "k") end)
      assert.has_error(function() r:eval("return 1", { {} }) end)
      assert.has_error(function() r:subscribe("", function() end) end)
      assert.has_error(function() r:subscribe("c", "not a function") end)
      assert.has_error(function() r:psubscribe(1, function() end) end)
      -- The connection is still fine after all this.
      assert.equal("PONG", r:ping())
    end)

    it("refuses commands that would break the shared connection", function()
      for _, cmd in ipairs({ "SUBSCRIBE", "psubscribe", "MONITOR", "SELECT", "AUTH", "MULTI", "EXEC", "WATCH", "QUIT" }) do
        assert.has_error(function() r:call(cmd, "x") end)
        assert.has_error(function() r:pipeline({ { cmd, "x" } }) end)
      end
      assert.has_error(function() r:call("CLIENT", "REPLY", "OFF") end)
      assert.has_error(function() r:client("reply", "OFF") end)
      assert.has_error(function() r:pipeline({ { "CLIENT", "REPLY", "SKIP" } }) end)
      assert.is_nil(r.select) -- no method for a refused command
      assert.is_nil(r["not a name"])
    end)

    it("cannot wait outside a wxd coroutine", function()
      local co = coroutine.wrap(function() return r:ping() end)
      assert.has_error(co)
      assert.equal("PONG", r:ping())
    end)

    it("needs a URL when config.lua has none", function()
      local saved = wxd.config
      wxd.config = {}
      local ok, err = pcall(redis.new)
      wxd.config = saved
      assert.is_false(ok)
      assert.matches("no redis in config.lua", err)
    end)
  end)
end)
