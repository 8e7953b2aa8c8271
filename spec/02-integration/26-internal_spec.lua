-- Signed internal APIs (wxd.internal) and CloudBase (wxd.cloudbase):
-- real wxd processes (2 workers) running spec/fixtures/apps/internal,
-- the fake WeChat API server for CloudBase, Redis for two nodes, and
-- signatures computed by the openssl command line and by Node's crypto.
-- Every handler of the app counts its calls (GET /_counts): a refused
-- request must leave the count as it was.
local H = require "helpers"
local cjson = require "cjson"
local wxd = require "wxd"
local crypto = require "wxd.crypto"
local internal = require "wxd.internal"
local task = require "wxd.task"

local KEY_A = "spec-key-a-" .. string.rep("a", 32)
local KEY_B = "spec-key-b-" .. string.rep("b", 32)
local WX_SECRET = "fake-secret-0123456789"
local JWT_SECRET = "spec-jwt-secret-0123456789abcdef0123"
local ALLOWED, OTHER = "wxallowed0000001", "wxother000000009"

local function env(t)
  local parts = {}
  for k, v in pairs(t) do parts[#parts + 1] = k .. "='" .. tostring(v) .. "'" end
  table.sort(parts)
  return table.concat(parts, " ")
end

local function json(r) return cjson.decode(r.body) end

-- A signed request: opts.key = { id, secret }, method, target, body,
-- appid, timestamp, nonce; `tamper(headers)` may change it after signing.
local function signed(srv, opts)
  local method = opts.method or "POST"
  local h = internal.sign({ key = opts.key, method = method, target = opts.target, body = opts.body,
    appid = opts.appid, timestamp = opts.timestamp, nonce = opts.nonce })
  h["Content-Type"] = "application/json"
  if opts.tamper then opts.tamper(h) end
  return srv:request(method, opts.path or opts.target, h, opts.body or "")
end

local A = { id = "svc-a", secret = KEY_A }
local B = { id = "cloudfn", secret = KEY_B }

local function counts(srv) return json(srv:get("/_counts")) end

describe("signed internal APIs", function()
  local fake, srv

  setup(function()
    fake = H.start(H.app("fakewx"), { workers = 1 })
    srv = H.start(H.app("internal"), { workers = 2, env = env({ SPEC_KEY_A = KEY_A, SPEC_KEY_B = KEY_B,
      SPEC_WX_SECRET = WX_SECRET, WXD_WECHAT_API_BASE = "http://127.0.0.1:" .. fake.port,
      SPEC_JWT_SECRET = JWT_SECRET }) })
  end)
  teardown(function()
    srv:stop(); srv:cleanup()
    fake:stop(); fake:cleanup()
  end)

  it("accepts a request signed with an active key, query and body included", function()
    local before = counts(srv).echo or 0
    local r = signed(srv, { key = A, target = "/internal/echo?b=2&a=1", body = '{"x":1}' })
    assert.equal(200, r.status, r.body)
    assert.equal("svc-a", json(r).key)
    assert.equal('{"x":1}', json(r).body)
    assert.equal("b=2&a=1", json(r).query)
    assert.equal(before + 1, counts(srv).echo)
  end)

  local now = function() return math.floor(wxd.now()) end
  for _, case in ipairs({
    { "no signature at all", 401, "missing signature", function(s)
      return s:request("POST", "/internal/echo", { ["Content-Type"] = "application/json" }, "{}") end },
    { "a wrong signature (another secret)", 401, "bad signature", function(s)
      return signed(s, { key = { id = "svc-a", secret = KEY_B }, target = "/internal/echo", body = "{}" }) end },
    { "a body changed after signing", 401, "bad signature", function(s)
      local h = internal.sign({ key = A, method = "POST", target = "/internal/echo", body = '{"amount":1}' })
      return s:request("POST", "/internal/echo", h, '{"amount":9}') end },
    { "a query changed after signing", 401, "bad signature", function(s)
      return signed(s, { key = A, target = "/internal/echo?amount=1", path = "/internal/echo?amount=9", body = "" }) end },
    { "a method changed after signing", 401, "bad signature", function(s)
      local h = internal.sign({ key = A, method = "GET", target = "/internal/echo" })
      return s:request("DELETE", "/internal/echo", h) end },
    { "an appid header changed after signing", 401, "bad signature", function(s)
      return signed(s, { key = A, target = "/internal/echo", body = "", appid = ALLOWED,
        tamper = function(h) h["X-Wechat-Appid"] = OTHER end }) end },
    { "an unknown key", 401, "unknown key", function(s)
      return signed(s, { key = { id = "svc-retired", secret = KEY_A }, target = "/internal/echo", body = "" }) end },
    { "a stale timestamp (2 minutes old, window 60 s)", 401, "stale timestamp", function(s)
      return signed(s, { key = A, target = "/internal/echo", body = "", timestamp = now() - 120 }) end },
    { "a timestamp from the future (2 minutes ahead)", 401, "stale timestamp", function(s)
      return signed(s, { key = A, target = "/internal/echo", body = "", timestamp = now() + 120 }) end },
    { "a timestamp that is no number", 401, "bad timestamp", function(s)
      return signed(s, { key = A, target = "/internal/echo", body = "", timestamp = "17e8" }) end },
    { "a nonce too short to be random", 401, "bad nonce", function(s)
      return signed(s, { key = A, target = "/internal/echo", body = "", nonce = "abc" }) end },
  }) do
    it("refuses " .. case[1] .. " with " .. case[2] .. " and never calls the handler", function()
      local before = counts(srv).echo or 0
      local r = case[4](srv)
      assert.equal(case[2], r.status, r.body)
      assert.equal("application/json", r.headers["content-type"])
      assert.equal(case[3], json(r).error)
      assert.is_string(json(r).error_description)
      assert.equal(before, counts(srv).echo or 0)
    end)
  end

  it("refuses a replayed nonce on the other worker too, and calls the handler once", function()
    local before = counts(srv).echo or 0
    local h = internal.sign({ key = A, method = "POST", target = "/internal/echo", body = "once" })
    local first = srv:request("POST", "/internal/echo", h, "once")
    assert.equal(200, first.status, first.body)
    local seen = {}
    -- Replays on fresh connections until both workers have refused one.
    for _ = 1, 200 do
      local r = srv:request("POST", "/internal/echo", h, "once")
      assert.equal(401, r.status, r.body)
      assert.equal("replayed nonce", json(r).error)
      seen[r.headers["x-worker"]] = true
      if seen["0"] and seen["1"] then break end
    end
    assert.truthy(seen["0"] and seen["1"], "both workers refused the replay")
    assert.equal(before + 1, counts(srv).echo)
  end)

  describe("appid and scope allow-lists", function()
    it("lets an allowed X-Wechat-Appid through and refuses another or none with 403", function()
      local before = counts(srv).appid or 0
      local ok = signed(srv, { key = A, target = "/internal/appid", body = "", appid = ALLOWED })
      assert.equal(200, ok.status, ok.body)
      assert.equal(ALLOWED, json(ok).appid)
      for _, appid in ipairs({ OTHER, false }) do
        local r = signed(srv, { key = A, target = "/internal/appid", body = "", appid = appid or nil })
        assert.equal(403, r.status, r.body)
        assert.equal("appid not allowed", json(r).error)
      end
      assert.equal(before + 1, counts(srv).appid)
    end)

    it("needs one of the route's scopes from the signing key", function()
      local before = counts(srv).scoped or 0
      -- svc-a grants no scopes: a scoped route is closed to it.
      local r = signed(srv, { key = A, target = "/internal/scoped", body = "" })
      assert.equal(403, r.status, r.body)
      assert.equal("insufficient scope", json(r).error)
      -- cloudfn grants events:write, for its own appid only.
      local ok = signed(srv, { key = B, target = "/internal/scoped", body = "", appid = ALLOWED })
      assert.equal(200, ok.status, ok.body)
      local wrong = signed(srv, { key = B, target = "/internal/scoped", body = "", appid = OTHER })
      assert.equal(403, wrong.status, wrong.body)
      assert.equal("appid not allowed", json(wrong).error)
      assert.equal(before + 1, counts(srv).scoped)
    end)

    it("checks an OAuth2 access token's scopes (wxd.jwt.bearer) per route", function()
      local key = require("wxd.jwt").key({ alg = "HS256", secret = JWT_SECRET })
      local function get(scope, appid)
        local tok = require("wxd.jwt").sign({ sub = "u1", scope = scope }, key, { expires_in = 60 })
        return srv:get("/oauth/orders", { Authorization = "Bearer " .. tok, ["X-Wechat-Appid"] = appid })
      end
      local before = counts(srv).orders or 0
      local ok = get("profile orders:read", ALLOWED)
      assert.equal(200, ok.status, ok.body)
      local r = get("profile", ALLOWED)
      assert.equal(403, r.status, r.body)
      assert.equal("insufficient scope", json(r).error)
      r = get("orders:admin", OTHER)
      assert.equal(403, r.status, r.body)
      assert.equal("appid not allowed", json(r).error)
      assert.equal(before + 1, counts(srv).orders)
    end)
  end)

  describe("independent implementations", function()
    it("accepts a signature computed by the openssl command line", function()
      local ts, nonce, body = now(), crypto.nonce(20), '{"from":"openssl"}'
      local dir = H.tmpdir()
      H.write_file(dir .. "/body", body)
      -- The canonical string, built by the shell: printf, and sha256 of the body by openssl.
      local cmd = string.format(
        "h=$(openssl dgst -sha256 -r <%s/body | cut -d' ' -f1); "
          .. "printf 'WXD1-HMAC-SHA256\\nPOST\\n/internal/echo?via=openssl\\n%d\\n%s\\n%s\\n%%s' \"$h\" "
          .. "| openssl dgst -sha256 -hmac '%s' -r | cut -d' ' -f1",
        dir, ts, nonce, ALLOWED, KEY_A)
      local sig = H.sh(cmd):match("^(%x+)")
      os.execute("rm -rf " .. dir)
      assert.equal(64, #sig)
      local r = srv:request("POST", "/internal/echo?via=openssl", { ["X-Wxd-Key"] = "svc-a",
        ["X-Wxd-Timestamp"] = tostring(ts), ["X-Wxd-Nonce"] = nonce, ["X-Wxd-Signature"] = sig,
        ["X-Wechat-Appid"] = ALLOWED }, body)
      assert.equal(200, r.status, r.body)
      assert.equal(body, json(r).body)
    end)

    it("accepts a request signed and sent by Node's crypto and http", function()
      local dir = H.tmpdir()
      H.write_file(dir .. "/client.js", [[
const crypto = require('crypto'), http = require('http');
const [port, keyId, secret] = process.argv.slice(2);
const body = JSON.stringify({ from: 'node', n: 42 });
const target = '/internal/echo?via=node&x=%20y';
const ts = Math.floor(Date.now() / 1000).toString();
const nonce = crypto.randomBytes(18).toString('base64url');
const canonical = ['WXD1-HMAC-SHA256', 'PUT', target, ts, nonce, '',
  crypto.createHash('sha256').update(body).digest('hex')].join('\n');
const sig = crypto.createHmac('sha256', secret).update(canonical).digest('hex');
const req = http.request({ host: '127.0.0.1', port, method: 'PUT', path: target, headers: {
  'X-Wxd-Key': keyId, 'X-Wxd-Timestamp': ts, 'X-Wxd-Nonce': nonce, 'X-Wxd-Signature': sig,
  'Content-Type': 'application/json' } }, (res) => {
  let data = ''; res.on('data', (c) => data += c);
  res.on('end', () => console.log(res.statusCode + ' ' + data));
});
req.end(body);
]])
      local out = H.sh(string.format("node %s/client.js %d svc-a '%s'", dir, srv.port, KEY_A))
      os.execute("rm -rf " .. dir)
      local status, rest = out:match("^(%d+) (.*)")
      assert.equal("200", status, out)
      local b = cjson.decode(rest)
      assert.equal("via=node&x=%20y", b.query)
      assert.equal(42, cjson.decode(b.body).n)
    end)
  end)

  describe("the client side (wxd.internal.request)", function()
    it("lets one wxd call another's internal API, signed with a named key or the config's", function()
      local before = counts(srv).echo or 0
      local url = "http://127.0.0.1:" .. srv.port .. "/internal/echo?from=peer"
      local r = srv:request("POST", "/call", { ["Content-Type"] = "application/json" },
        cjson.encode({ url = url, body = "hello", key = "svc-a" }))
      assert.equal(200, r.status, r.body)
      local inner = json(r)
      assert.equal(200, inner.status, inner.body)
      assert.equal("svc-a", cjson.decode(inner.body).key)
      assert.equal("hello", cjson.decode(inner.body).body)
      -- Without a key: sign_with, by default the last key listed (cloudfn).
      r = srv:request("POST", "/call", { ["Content-Type"] = "application/json" },
        cjson.encode({ url = url, body = "x", appid = ALLOWED }))
      assert.equal("cloudfn", cjson.decode(json(r).body).key)
      assert.equal(before + 2, counts(srv).echo)
    end)
  end)

  describe("CloudBase", function()
    local function ctl(method, path, body)
      local r = fake:request(method, path, { ["Content-Type"] = "application/json" }, body and cjson.encode(body))
      assert.equal(200, r.status, r.body)
      return json(r)
    end
    local function invoke(args)
      return srv:request("POST", "/cb/invoke", { ["Content-Type"] = "application/json" }, cjson.encode(args))
    end
    before_each(function() ctl("POST", "/_ctl/reset") end)

    it("calls a cloud function with the access_token, the event as the body, and decodes resp_data", function()
      local r = invoke({ name = "echo", data = { a = 1, text = "你好" } })
      assert.equal(200, r.status, r.body)
      local result = json(r).result
      assert.equal("spec-env", result.env)
      assert.equal(1, result.event.a)
      assert.equal("你好", result.event.text)
      local c = ctl("GET", "/_ctl/counts")
      assert.equal(1, c.tcb)
      assert.equal(0, c.tcb_refused)
    end)

    it("returns WeChat's errcode, and renews a revoked access_token once", function()
      local r = invoke({ name = "no-such-function" })
      assert.equal(502, r.status)
      assert.equal("wechat", json(r).error)
      assert.equal(-501000, json(r).info.errcode)
      local refused = ctl("GET", "/_ctl/counts").tcb_refused
      ctl("POST", "/_ctl/revoke", { rotate = true })
      r = invoke({ name = "echo", data = {} })
      assert.equal(200, r.status, r.body)
      assert.equal(refused + 1, ctl("GET", "/_ctl/counts").tcb_refused)
    end)

    it("gives up after 3 seconds by default (CloudBase's function timeout)", function()
      -- The function takes 8 s: with a longer deadline the call would succeed.
      local r = invoke({ name = "slow", data = { ms = 8000 } })
      assert.equal(502, r.status)
      assert.equal("timeout", json(r).error)
    end)

    it("answers a cloud function's call within the deadline while the handler goes on", function()
      local before = counts(srv).cb_slow_done or 0
      local r = signed(srv, { key = A, target = "/internal/cb/slow", body = '{"ms":3000}' })
      assert.equal(503, r.status, r.body)
      assert.equal("deadline exceeded", json(r).error)
      assert.equal("1", r.headers["retry-after"])
      H.wait_until(function() return (counts(srv).cb_slow_done or 0) == before + 1 end, 10, "the handler to end")
      local fast = signed(srv, { key = A, target = "/internal/cb/slow", body = '{"ms":0}' })
      assert.equal(200, fast.status, fast.body)
      assert.equal(0, json(fast).slept)
    end)

    it("hands a cloud function's event to the queue and answers 202 at once (enqueue)", function()
      local body = '{"event":"paid","order":"' .. crypto.nonce(8) .. '"}'
      local r = signed(srv, { key = B, target = "/internal/cb/events", body = body, appid = ALLOWED })
      assert.equal(202, r.status, r.body)
      assert.is_string(json(r).id)
      H.wait_until(function() return counts(srv)["event:" .. ALLOWED .. ":" .. body] == 1 end, 10, "the consumer")
      -- Not for a key without the scope.
      r = signed(srv, { key = A, target = "/internal/cb/events", body = body })
      assert.equal(403, r.status, r.body)
    end)

    it("hands calls to the retry queue (invoke_async) and its consumer makes them", function()
      -- A stand-in for wxd.queue records what is pushed and lets the spec
      -- deliver by hand, attempt by attempt (the fixture app's enqueue
      -- route above goes through the real queue).
      local had = package.loaded["wxd.queue"]
      local pushed, consumers = {}, {}
      package.loaded["wxd.queue"] = {
        push = function(name, payload, o)
          pushed[#pushed + 1] = { name = name, payload = payload, key = o and o.key }
          return "m" .. #pushed
        end,
        consume = function(name, handler) consumers[name] = handler end,
      }
      local ok, err = pcall(function()
        local cloudbase = require "wxd.cloudbase"
        local wx = require("wxd.wechat").client({ appid = "wxfake0000000001", secret = WX_SECRET,
          api_base = "http://127.0.0.1:" .. fake.port, background = false, quota = false })
        assert.is_true(cloudbase.consume())
        assert.equal("m1", cloudbase.invoke_async({ client = wx, env = "spec-env", name = "count",
          data = { id = "order-7" }, key = "order-7" }))
        assert.equal("wxd.cloudbase", pushed[1].name)
        assert.equal("order-7", pushed[1].key)
        local deliver = consumers["wxd.cloudbase"]
        assert.is_function(deliver)
        -- First delivery: WeChat busy once -> not acknowledged (redelivered).
        ctl("POST", "/_ctl/config", { fail = { errcode = -1, errmsg = "system error", times = 1 } })
        local d1, why = deliver(pushed[1].payload, { id = "m1", attempt = 1 })
        assert.is_nil(d1)
        assert.truthy(tostring(why):find("-1", 1, true))
        assert.is_true(deliver(pushed[1].payload, { id = "m1", attempt = 2 }))
        assert.equal(1, ctl("GET", "/_ctl/tcb/order-7").n)
      end)
      package.loaded["wxd.queue"] = had
      assert(ok, err)
    end)
  end)
end)

describe("nonces across two wxd nodes", function()
  local function start_node(extra)
    local e = { SPEC_KEY_A = KEY_A, SPEC_KEY_B = KEY_B }
    for k, v in pairs(extra or {}) do e[k] = v end
    return H.start(H.app("internal"), { workers = 2, env = env(e) })
  end

  it("refuses on node B a request node A accepted, with the store in Redis", function()
    local prefix = "spec:" .. crypto.nonce(8) .. ":"
    local a = start_node({ SPEC_REDIS_URL = H.redis_url(), SPEC_STORE_PREFIX = prefix })
    local b = start_node({ SPEC_REDIS_URL = H.redis_url(), SPEC_STORE_PREFIX = prefix })
    local ok, err = pcall(function()
      for i = 1, 5 do
        local h = internal.sign({ key = A, method = "POST", target = "/internal/echo", body = "n" .. i })
        local first, second = a, b
        if i % 2 == 0 then first, second = b, a end
        assert.equal(200, first:request("POST", "/internal/echo", h, "n" .. i).status)
        local r = second:request("POST", "/internal/echo", h, "n" .. i)
        assert.equal(401, r.status, r.body)
        assert.equal("replayed nonce", json(r).error)
      end
      assert.equal(5, (counts(a).echo or 0) + (counts(b).echo or 0))
    end)
    a:stop(); a:cleanup()
    b:stop(); b:cleanup()
    assert(ok, err)
  end)

  it("(the control) accepts it on both when each node keeps its nonces in its own memory", function()
    local a, b = start_node(), start_node()
    local ok, err = pcall(function()
      local h = internal.sign({ key = A, method = "POST", target = "/internal/echo", body = "x" })
      assert.equal(200, a:request("POST", "/internal/echo", h, "x").status)
      assert.equal(200, b:request("POST", "/internal/echo", h, "x").status)
    end)
    a:stop(); a:cleanup()
    b:stop(); b:cleanup()
    assert(ok, err)
  end)
end)

describe("a nonce store that fails", function()
  it("refuses with 503 (fail closed) and calls no handler", function()
    local redis = H.redis_server()
    local srv = H.start(H.app("internal"), { workers = 1, env = env({ SPEC_KEY_A = KEY_A, SPEC_KEY_B = KEY_B,
      SPEC_REDIS_URL = redis.url }) })
    local ok, err = pcall(function()
      assert.equal(200, signed(srv, { key = A, target = "/internal/echo", body = "up" }).status)
      redis:stop()
      local r = signed(srv, { key = A, target = "/internal/echo", body = "down" })
      assert.equal(503, r.status, r.body)
      assert.equal("nonce store unavailable", json(r).error)
      assert.equal(1, counts(srv).echo)
    end)
    srv:stop(); srv:cleanup()
    redis:cleanup()
    assert(ok, err)
  end)
end)

describe("key rotation", function()
  local OLD = "spec-old-" .. string.rep("o", 32)
  local NEW = "spec-new-" .. string.rep("n", 32)

  local function write_config(dir, ids)
    local keys = {}
    for _, id in ipairs(ids) do
      keys[#keys + 1] = string.format('{ id = "%s", secret = env("SPEC_ROT_%s") }', id, id:upper())
    end
    H.write_file(dir .. "/config.lua", "return { internal = { keys = { " .. table.concat(keys, ", ")
      .. " }, window = 60 }, shdict = { spec_counts = \"1m\" }, log = { access = false },"
      .. " mp = { appid = \"wxfake0000000001\", secret = env(\"SPEC_WX_SECRET\", \"unused\") },"
      .. " app = { jwt_secret = env(\"SPEC_JWT_SECRET\", \"spec-jwt-secret-0123456789abcdef0123\") } }\n")
  end

  it("keeps every request succeeding while a reload adds the new key and a second drops the old", function()
    local dir = H.tmpdir()
    os.execute("cp -r " .. H.app("internal") .. "/. " .. dir)
    write_config(dir, { "old" })
    local srv = H.start(dir, { workers = 2, pid = true, env = env({ SPEC_ROT_OLD = OLD, SPEC_ROT_NEW = NEW }) })
    local keys = { old = { id = "old", secret = OLD }, new = { id = "new", secret = NEW } }
    local use, running = "old", true
    local ok_by_key, failures = { old = 0, new = 0 }, {}
    local base = "http://127.0.0.1:" .. srv.port
    local function client()
      while running do
        local k = use
        local body = crypto.nonce(8)
        local h = internal.sign({ key = keys[k], method = "POST", target = "/internal/echo", body = body })
        local res, err = require("wxd.http").request({ method = "POST", url = base .. "/internal/echo",
          headers = h, body = body, timeout = 10 })
        if res and res.status == 200 then ok_by_key[k] = ok_by_key[k] + 1
        else failures[#failures + 1] = (res and (res.status .. " " .. res.body)) or tostring(err) end
      end
    end
    local function reload()
      local out, code = H.sh(H.WXD .. " reload --pid " .. srv.dir .. "/wxd.pid")
      assert.equal(0, code, out)
    end
    local ok, err = pcall(function()
      local clients = {}
      for i = 1, 4 do clients[i] = task.spawn(client) end
      H.wait_until(function() return ok_by_key.old >= 50 end, 20, "load with the old key")
      write_config(dir, { "old", "new" })
      reload()
      -- Both accepted now: callers move over one by one (here: at once).
      local old_before = ok_by_key.old
      H.wait_until(function() return ok_by_key.old >= old_before + 20 end, 20, "old still accepted")
      use = "new"
      H.wait_until(function() return ok_by_key.new >= 50 end, 20, "load with the new key")
      write_config(dir, { "new" })
      reload()
      local new_before = ok_by_key.new
      H.wait_until(function() return ok_by_key.new >= new_before + 50 end, 20, "load after the old key left")
      running = false
      for _, c in ipairs(clients) do c:wait(15000) end
      assert.same({}, failures)
      -- The old key is refused from now on.
      local r = signed(srv, { key = keys.old, target = "/internal/echo", body = "" })
      assert.equal(401, r.status, r.body)
      assert.equal("unknown key", json(r).error)
    end)
    running = false
    srv:stop(); srv:cleanup()
    os.execute("rm -rf " .. dir)
    assert(ok, err)
  end)
end)
