-- wxd.mp's run claim: one key per message and two store writes per run (the
-- claim, an add of PENDING for handler_timeout, and the reply set over it
-- for dedup_ttl); a retry during the run waits for the reply (natively with
-- the shdict, polling with Redis) and answers with it; a claim that
-- expired past handler_timeout lets a second run start. Both store
-- backends: Redis through the module's functions pointed at a Redis store.
local mp = require "wxd.mp"
local testing = require "wxd.testing"
local metrics = require "wxd.metrics"
local store = require "wxd.store"
local shdict = require "wxd.shdict"
local wxd = require "wxd"
local H = require "helpers"
local C = require "fixtures.mp.conf"

local STORE_FNS = { "get", "set", "add", "incr", "delete", "cas", "ttl", "lock", "wait_change" }

local function sample(prefix)
  for line in metrics.render():gmatch("[^\n]+") do
    if line:sub(1, #prefix) == prefix then return tonumber(line:sub(#prefix + 2)) end
  end
  return 0
end

local function count(outcome)
  return sample('wxd_mp_messages_total{type="text",outcome="' .. outcome .. '",reason=""}')
end

-- Points the module's functions (what wxd.mp calls) at store `s` and
-- records every call as { name, key }; returns the log and an undo.
local function route_store(s)
  local saved, calls = {}, {}
  for _, name in ipairs(STORE_FNS) do
    saved[name] = store[name]
    store[name] = function(key, ...)
      calls[#calls + 1] = { name, key }
      return s[name](s, key, ...)
    end
  end
  return calls, function()
    for name, f in pairs(saved) do store[name] = f end
  end
end

-- Starts app:handle(req) in a timer coroutine; .out gets its results.
local function deliver(app, req)
  local d = {}
  wxd.timer.after(0, function()
    d.out = { app:handle(req) }
  end)
  return d
end

local gates = shdict.declare("mp_claim_gates", "64k")

local backends = {
  { name = "memory", cfg = function() return { backend = "memory", shdict = "mp_claim_store" } end },
  { name = "redis", cfg = function()
    return { backend = "redis", redis = H.redis_url(), prefix = "spec:claim:" .. wxd.now() .. ":" }
  end },
}

for _, b in ipairs(backends) do
  describe("wxd.mp run claim (" .. b.name .. " store)", function()
    local calls, undo, runs, app, wx
    local appid = "wxclaim" .. b.name
    setup(function()
      shdict.declare("mp_claim_store", "4m")
      calls, undo = route_store(store.new(b.cfg()))
      runs = 0
      app = require("wxd.app").new()
      app:mp("/wx", { token = C.token, appid = appid, deadline_ms = 10000, handler_timeout = 1 }, {
        -- Content "gate:NAME" waits until the spec opens that gate.
        text = function(msg)
          runs = runs + 1
          local n = runs
          local gate = msg.Content:match("^gate:(.+)$")
          if gate then assert(gates:wait_change(gate, nil, 20)) end
          return "run " .. n .. " of " .. msg.Content
        end,
      })
      wx = testing.wechat({ token = C.token, appid = appid, mode = "plaintext" })
    end)
    teardown(function() undo() end)
    before_each(function()
      runs = 0
      for i = #calls, 1, -1 do calls[i] = nil end
    end)

    it("handles a first delivery with two store writes on one key: the claim and the reply", function()
      local msg = wx:message({ MsgType = "text", Content = "two ops" })
      local reply = wx:send(app, msg)
      assert.equal("run 1 of two ops", reply.Content)
      local cjson = require "cjson"
      assert.equal(2, #calls, "store calls: " .. cjson.encode(calls))
      assert.equal("add", calls[1][1])
      assert.equal("set", calls[2][1])
      assert.equal(calls[1][2], calls[2][2], "one key")
      -- A retry after the run: its add fails and it reads the reply; no write.
      for i = #calls, 1, -1 do calls[i] = nil end
      assert.same(reply, wx:send(app, msg, { nonce = "again" }))
      assert.equal(1, runs)
      assert.equal(2, #calls, "store calls: " .. cjson.encode(calls))
      assert.equal("add", calls[1][1])
      assert.equal("wait_change", calls[2][1])
    end)

    it("answers a retry that arrives during the run with the run's reply once it ends", function()
      local h0, d0 = count("handled"), count("duplicate")
      local gate = "g" .. b.name .. wxd.now()
      local msg = wx:message({ MsgType = "text", Content = "gate:" .. gate })
      local first = deliver(app, (wx:request(msg)))
      H.wait_until(function() return runs == 1 end, 10, "the first run")
      local retries = {}
      for i = 1, 3 do retries[i] = deliver(app, (wx:request(msg, { nonce = "r" .. i }))) end
      -- The retries are waiting on the claim (PENDING): none has answered.
      H.wait_until(function()
        local n = 0
        for _, c in ipairs(calls) do if c[1] == "wait_change" then n = n + 1 end end
        return n >= 3
      end, 10, "the retries waiting")
      assert.is_nil(first.out)
      for _, r in ipairs(retries) do assert.is_nil(r.out) end
      gates:set(gate, true)
      H.wait_until(function()
        if not first.out then return false end
        for _, r in ipairs(retries) do if not r.out then return false end end
        return true
      end, 10, "every answer")
      local want = assert(wx:open_reply(first.out[3]))
      assert.equal("run 1 of gate:" .. gate, want.Content)
      for _, r in ipairs(retries) do
        assert.equal(200, r.out[1])
        assert.same(want, assert(wx:open_reply(r.out[3])))
      end
      assert.equal(1, runs)
      assert.equal(h0 + 1, count("handled"))
      assert.equal(d0 + 3, count("duplicate"))
    end)

    it("lets a second run start once a run outlived handler_timeout (its claim expired)", function()
      local gate = "h" .. b.name .. wxd.now()
      local msg = wx:message({ MsgType = "text", Content = "gate:" .. gate })
      local first = deliver(app, (wx:request(msg)))
      H.wait_until(function() return runs == 1 end, 10, "the first run")
      -- A retry during the run waits; the claim expires after 1 s; the
      -- retry then claims the message and runs it itself.
      local retry = deliver(app, (wx:request(msg, { nonce = "late" })))
      H.wait_until(function() return runs == 2 end, 10, "the second run, after handler_timeout")
      gates:set(gate, true)
      H.wait_until(function() return first.out and retry.out end, 10, "both answers")
      assert.equal("run 1 of gate:" .. gate, assert(wx:open_reply(first.out[3])).Content)
      assert.equal("run 2 of gate:" .. gate, assert(wx:open_reply(retry.out[3])).Content)
    end)
  end)
end

describe("wxd.mp run claim", function()
  it("answers success, counted duplicate, when the store cannot take the claim", function()
    local app = require("wxd.app").new()
    local ran = false
    app:mp("/wx", { token = C.token, appid = "wxclaimfull" }, { text = function() ran = true; return "x" end })
    local wx = testing.wechat({ token = C.token, appid = "wxclaimfull", mode = "plaintext" })
    local saved = store.add
    store.add = function() return nil, "no memory" end
    local d0 = count("duplicate")
    local ok, reply = pcall(wx.send, wx, app, { MsgType = "text", Content = "full" })
    store.add = saved
    assert.is_true(ok, tostring(reply))
    assert.equal("success", reply)
    assert.is_false(ran)
    assert.equal(d0 + 1, count("duplicate"))
    assert.is_true(mp.is_reply(mp.reply.text("still works")))
  end)
end)
