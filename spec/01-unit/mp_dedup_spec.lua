-- wxd.mp: WeChat's retries run a handler once and get the same reply; a
-- slow handler is answered "success" in time and its reply goes to
-- on_late_reply. Concurrent deliveries are timer coroutines calling
-- app:handle, as requests would.
local mp = require "wxd.mp"
local testing = require "wxd.testing"
local timer = require "wxd.timer"
local wxd = require "wxd"
local H = require "helpers"
local C = require "fixtures.mp.conf"

local function new_app(cfg, handlers)
  local app = require("wxd.app").new()
  app:mp("/wx", cfg, handlers)
  return app
end

-- Runs app:handle(req) for each request at once; returns the results
-- ({ status, headers, body } each) once all ended.
local function concurrently(app, reqs)
  local out, n = {}, 0
  for i, req in ipairs(reqs) do
    timer.after(0, function()
      out[i] = { app:handle(req) }
      n = n + 1
    end)
  end
  H.wait_until(function() return n == #reqs end, 10, "the deliveries")
  return out
end

for _, mode in ipairs({ "plaintext", "safe" }) do
  describe("wxd.mp retries (" .. mode .. ")", function()
    local appid = "wxdedup" .. mode
    local runs = 0
    local cfg = { token = C.token, appid = appid, aes_key = mode == "safe" and C.key1 or nil }
    local app = new_app(cfg, {
      text = function(msg)
        runs = runs + 1
        wxd.sleep(tonumber(msg.Content) or 0)
        return mp.reply.text("run " .. runs .. " " .. wxd.now())
      end,
      event = function(_msg)
        runs = runs + 1
        return "event run " .. runs
      end,
    })
    local wx = testing.wechat({ token = C.token, appid = appid, aes_key = cfg.aes_key, mode = mode })
    before_each(function() runs = 0 end)

    it("runs the handler once for the same request sent three times, with the same reply", function()
      local req = wx:request({ MsgType = "text", Content = "0" })
      local replies = {}
      for i = 1, 3 do
        local status, _, body = app:handle(req)
        assert.equal(200, status)
        replies[i] = assert(wx:open_reply(body))
      end
      assert.equal(1, runs)
      assert.same(replies[1], replies[2])
      assert.same(replies[1], replies[3])
    end)

    it("recognises a retry signed anew (new timestamp and nonce, same MsgId)", function()
      local msg = wx:message({ MsgType = "text", Content = "0" })
      local first = wx:send(app, msg)
      local again = wx:send(app, msg, { nonce = "99", timestamp = math.floor(wxd.now()) - 5 })
      assert.equal(1, runs)
      assert.same(first, again)
    end)

    it("runs the handler once when the same message arrives three times at once", function()
      local msg = wx:message({ MsgType = "text", Content = "200" }) -- the handler waits 200 ms
      local reqs = {}
      for i = 1, 3 do reqs[i] = (wx:request(msg, { nonce = tostring(i) })) end
      local out = concurrently(app, reqs)
      assert.equal(1, runs)
      local first = assert(wx:open_reply(out[1][3]))
      assert.truthy(first.Content:find("^run 1 "))
      for i = 2, 3 do
        assert.equal(200, out[i][1])
        assert.same(first, assert(wx:open_reply(out[i][3])))
      end
    end)

    it("tells events apart by any field: sender, CreateTime, Event, EventKey", function()
      local ev = wx:message({ MsgType = "event", Event = "CLICK", EventKey = "K", CreateTime = 1700000000 })
      assert.equal("event run 1", (wx:send(app, ev)).Content)
      assert.equal("event run 1", (wx:send(app, ev)).Content)
      ev.CreateTime = 1700000001
      assert.equal("event run 2", (wx:send(app, ev)).Content)
      ev.FromUserName = "o_someone_else_00000000000"
      assert.equal("event run 3", (wx:send(app, ev)).Content)
      ev.Event = "VIEW"
      assert.equal("event run 4", (wx:send(app, ev)).Content)
      ev.EventKey = "K2"
      assert.equal("event run 5", (wx:send(app, ev)).Content)
      assert.equal("event run 5", (wx:send(app, ev)).Content)
      assert.equal(5, runs)
    end)

    it("runs different messages separately", function()
      wx:send(app, { MsgType = "text", Content = "0" })
      wx:send(app, { MsgType = "text", Content = "0" })
      assert.equal(2, runs)
    end)
  end)
end

describe("wxd.mp deadline", function()
  it("answers success within the deadline while the handler goes on; the late reply goes to on_late_reply", function()
    local late, finished = {}, false
    local app = new_app({ token = C.token, appid = "wxdeadline1", deadline_ms = 300,
                          on_late_reply = function(msg, reply, ctx)
                            late[#late + 1] = { msg = msg, reply = reply, ctx = ctx }
                          end },
      { text = function(msg)
          wxd.sleep(1500)
          finished = true
          return mp.reply.text("late " .. msg.Content)
        end })
    local wx = testing.wechat({ token = C.token })
    local msg = wx:message({ MsgType = "text", Content = "q" })
    local t0 = wxd.monotonic_ms()
    local reply, status = wx:send(app, msg)
    local took = wxd.monotonic_ms() - t0
    assert.equal(200, status)
    assert.equal("success", reply)
    assert.is_false(finished)
    assert.truthy(took >= 250 and took < 1400, "answered after " .. took .. " ms")
    -- A retry while the handler still runs waits for it, past its own
    -- deadline gets success, and does not start a second run.
    assert.equal("success", (wx:send(app, msg)))
    H.wait_until(function() return #late == 1 end, 5, "the late reply")
    assert.is_true(finished)
    assert.equal("q", late[1].msg.Content)
    assert.is_true(mp.is_reply(late[1].reply))
    assert.equal("late q", late[1].reply.Content)
    assert.equal("mp", late[1].ctx.kind)
    -- What WeChat got was "success": a later retry gets that, not the late reply.
    assert.equal("success", (wx:send(app, msg)))
    assert.equal(1, #late)
  end)

  it("logs a late reply as dropped when there is no hook", function()
    local done = false
    local app = new_app({ token = C.token, appid = "wxdeadline2", deadline_ms = 100 },
      { text = function() wxd.sleep(400); done = true; return "too late" end })
    local wx = testing.wechat({ token = C.token })
    assert.equal("success", (wx:send(app, { MsgType = "text", Content = "x" })))
    H.wait_until(function() return done end, 5, "the handler")
    wxd.sleep(20)
  end)

  it("answers at once when the handler is quick, well before the deadline", function()
    local app = new_app({ token = C.token, appid = "wxdeadline3", deadline_ms = 3000 },
      { text = function(msg) return "fast " .. msg.Content end })
    local wx = testing.wechat({ token = C.token })
    local t0 = wxd.monotonic_ms()
    local reply = wx:send(app, { MsgType = "text", Content = "x" })
    assert.equal("fast x", reply.Content)
    assert.truthy(wxd.monotonic_ms() - t0 < 2000)
  end)

  it("runs the handler itself when a reload closed its timer before it fired", function()
    local app = new_app({ token = C.token, appid = "wxdeadline5", deadline_ms = 3000 },
      { text = function(msg) return "still ran " .. msg.Content end })
    local wx = testing.wechat({ token = C.token })
    local real_after = timer.after
    -- What a reload does to a timer of the replaced generation: it is
    -- cancelled before it fires.
    timer.after = function(ms, fn)
      local h = real_after(ms + 10000, fn)
      h:cancel()
      return h
    end
    local ok, reply = pcall(wx.send, wx, app, { MsgType = "text", Content = "x" })
    timer.after = real_after
    assert.is_true(ok, tostring(reply))
    assert.equal("still ran x", reply.Content)
  end)

  it("lets a handler wait (sleep) before replying within the deadline", function()
    local app = new_app({ token = C.token, appid = "wxdeadline4", deadline_ms = 3000 },
      { text = function() wxd.sleep(50); return "after a nap" end })
    local wx = testing.wechat({ token = C.token })
    assert.equal("after a nap", (wx:send(app, { MsgType = "text", Content = "x" })).Content)
  end)
end)
