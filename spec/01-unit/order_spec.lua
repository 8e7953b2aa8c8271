-- wxd.order: the state machine against both backends (the core's store
-- with a journal in a temp dir, and the redis-server of spec/run.sh). The
-- table of legal transitions is written out here independently of the C
-- table, so that a change to either one fails.
local wxd = require "wxd"
local order = require "wxd.order"
local task = require "wxd.task"
local H = require "helpers"

local EXPECTED = {
  CREATED = { PAYING = true, CLOSED = true },
  PAYING = { PAID = true, FAILED = true, CLOSED = true },
  PAID = { CONFIRMED = true, REFUNDING = true },
  FAILED = {},
  CONFIRMED = { REFUNDING = true },
  CLOSED = {},
  REFUNDING = { REFUNDED = true, REFUND_FAILED = true },
  REFUNDED = {},
  REFUND_FAILED = { REFUNDING = true },
}
-- How to reach each state from CREATED.
local PATH = {
  CREATED = {},
  PAYING = { "PAYING" },
  PAID = { "PAYING", "PAID" },
  FAILED = { "PAYING", "FAILED" },
  CONFIRMED = { "PAYING", "PAID", "CONFIRMED" },
  CLOSED = { "CLOSED" },
  REFUNDING = { "PAYING", "PAID", "REFUNDING" },
  REFUNDED = { "PAYING", "PAID", "REFUNDING", "REFUNDED" },
  REFUND_FAILED = { "PAYING", "PAID", "REFUNDING", "REFUND_FAILED" },
}
local STATES = { "CREATED", "PAYING", "PAID", "FAILED", "CONFIRMED", "CLOSED", "REFUNDING", "REFUNDED",
  "REFUND_FAILED" }

local tmp = H.tmpdir()
local run = tostring(math.floor(wxd.now() * 1000))

local backends = {
  { name = "memory", cfg = function() return { backend = "memory", journal = tmp .. "/unit.journal" } end },
  { name = "redis", cfg = function()
    return { backend = "redis", redis = H.redis_url(), prefix = "spec:" .. run .. ":" }
  end },
}

local seq = 0
local function new_no(prefix)
  seq = seq + 1
  return (prefix or "T") .. run .. "-" .. seq
end

local function new_order(s, no)
  local o, st = s:create{ out_trade_no = no, amount = 100, currency = "CNY", appid = "wxapp", mchid = "1900",
    payer_openid = "oOPENID" }
  assert(o, st)
  assert.equal("ok", st)
  return o
end

local function move(s, no, path)
  for i, to in ipairs(path) do
    local o, st = s:transition(no, to, { key = "path-" .. i .. "-" .. to, event = "E" })
    assert(o, st)
    assert.equal("ok", st)
  end
end

describe("wxd.order table", function()
  it("is the table of docs/order.md", function()
    assert.same(STATES, order.STATES)
    for _, from in ipairs(STATES) do
      for _, to in ipairs(STATES) do
        assert.equal(EXPECTED[from][to] == true, order.legal(from, to), from .. " -> " .. to)
      end
    end
  end)
end)

for _, b in ipairs(backends) do
  describe("wxd.order (" .. b.name .. ")", function()
    local s
    setup(function()
      s = order.new(b.cfg())
      assert.equal(b.name, s.backend)
    end)

    it("creates an order, and the same order again is a duplicate", function()
      local no = new_no()
      local o = new_order(s, no)
      assert.equal("CREATED", o.state)
      assert.equal(0, o.version)
      assert.equal(100, o.amount)
      assert.equal("oOPENID", o.payer_openid)
      assert.same({}, o.history)
      assert.is_true(o.created_at > 1.7e12)
      local again, st = s:create{ out_trade_no = no, amount = 100, currency = "CNY", appid = "wxapp", mchid = "1900",
        payer_openid = "oOPENID" }
      assert.equal("duplicate", st)
      assert.equal(no, again.out_trade_no)
      local none, err = s:create{ out_trade_no = no, amount = 200, currency = "CNY" }
      assert.is_nil(none)
      assert.equal("exists", err)
      local keyed = new_no()
      assert(s:create{ out_trade_no = keyed, amount = 1, key = "create-1" })
      local dup, st2 = s:create{ out_trade_no = keyed, amount = 2, key = "create-1" }
      assert.equal("duplicate", st2)
      assert.equal(1, dup.amount)
    end)

    it("makes every legal transition and refuses every illegal one, changing nothing", function()
      local legal, illegal = 0, 0
      for _, from in ipairs(STATES) do
        for _, to in ipairs(STATES) do
          local no = new_no("M")
          new_order(s, no)
          move(s, no, PATH[from])
          local before = assert(s:get(no))
          assert.equal(from, before.state)
          local o, st = s:transition(no, to, { key = "k-" .. to, event = "EV", data = { n = 1 } })
          if EXPECTED[from][to] then
            legal = legal + 1
            assert.equal("ok", st, from .. " -> " .. to)
            assert.equal(to, o.state)
            assert.equal(before.version + 1, o.version)
            local h = o.history[#o.history]
            assert.same({ from = from, to = to, event = "EV", key = "k-" .. to, data = { n = 1 } },
              { from = h.from, to = h.to, event = h.event, key = h.key, data = h.data })
            assert.is_true(h.at >= before.updated_at)
          else
            illegal = illegal + 1
            assert.is_nil(o)
            assert.equal("illegal transition " .. from .. " -> " .. to, st)
            local after = assert(s:get(no))
            assert.equal(from, after.state)
            assert.equal(before.version, after.version)
            assert.equal(#before.history, #after.history)
          end
        end
      end
      assert.equal(11, legal)
      assert.equal(70, illegal)
    end)

    it("answers the same key again with duplicate and changes nothing, even after the order moved on", function()
      local no = new_no()
      new_order(s, no)
      move(s, no, { "PAYING" })
      local o1, st1 = s:transition(no, "PAID", { key = "notify-1", event = "TRANSACTION.SUCCESS" })
      assert.equal("ok", st1)
      local o2, st2 = s:transition(no, "PAID", { key = "notify-1", event = "TRANSACTION.SUCCESS" })
      assert.equal("duplicate", st2)
      assert.equal(o1.version, o2.version)
      assert(s:transition(no, "CONFIRMED", { key = "confirm" }))
      local o3, st3 = s:transition(no, "PAID", { key = "notify-1", event = "TRANSACTION.SUCCESS" })
      assert.equal("duplicate", st3)
      assert.equal("CONFIRMED", o3.state)
      assert.equal(o1.version + 1, o3.version)
      local none, err = s:transition(no, "REFUNDING", { key = "notify-1" })
      assert.is_nil(none)
      assert.equal("key reused for another transition", err)
    end)

    it("is a compare-and-set on the version when asked", function()
      local no = new_no()
      new_order(s, no)
      local none, err = s:transition(no, "PAYING", { key = "v", version = 5 })
      assert.is_nil(none)
      assert.equal("version conflict", err)
      local o, st = s:transition(no, "PAYING", { key = "v", version = 0 })
      assert.equal("ok", st)
      assert.equal(1, o.version)
    end)

    it("says not found for an unknown order", function()
      local none, err = s:transition("nope" .. run, "PAYING", { key = "x" })
      assert.is_nil(none)
      assert.equal("not found", err)
      none, err = s:get("nope" .. run)
      assert.is_nil(none)
      assert.equal("not found", err)
    end)

    it("records a late event (PAID for a CLOSED order) once, counts it and runs on_late", function()
      local seen = {}
      order.on_late(function(o, ev) seen[#seen + 1] = { o.out_trade_no, o.state, ev.to, ev.key } end)
      local no = new_no()
      new_order(s, no)
      move(s, no, { "PAYING", "CLOSED" })
      local late_before = s:stats().late
      for _ = 1, 2 do
        local none, err = s:transition(no, "PAID", { key = "late-1", event = "TRANSACTION.SUCCESS" })
        assert.is_nil(none)
        assert.equal("illegal transition CLOSED -> PAID", err)
      end
      local o = assert(s:get(no))
      assert.equal("CLOSED", o.state)
      assert.equal(1, #o.late)
      assert.equal("late-1", o.late[1].key)
      assert.equal("PAID", o.late[1].to)
      assert.equal(late_before + 1, s:stats().late)
      H.wait_until(function() return #seen >= 1 end, 5, "on_late")
      assert.same({ no, "CLOSED", "PAID", "late-1" }, seen[1])
      wxd.sleep(50)
      assert.equal(1, #seen)
      order.hooks{ on_late = function() end }
    end)

    it("gives exactly one transition to 100 concurrent duplicate events", function()
      local no = new_no()
      new_order(s, no)
      move(s, no, { "PAYING" })
      local hs = {}
      for i = 1, 100 do
        hs[i] = task.spawn(function() return s:transition(no, "PAID", { key = "same", event = "E" }) end)
      end
      local count = {}
      for i = 1, 100 do
        local _, st = hs[i]:wait(20000)
        count[st] = (count[st] or 0) + 1
      end
      assert.same({ ok = 1, duplicate = 99 }, count)
      local o = assert(s:get(no))
      assert.equal(2, o.version)
      assert.equal(2, #o.history)
    end)

    it("gives exactly one transition to 100 concurrent events with different keys", function()
      local no = new_no()
      new_order(s, no)
      move(s, no, { "PAYING" })
      local hs = {}
      for i = 1, 100 do
        hs[i] = task.spawn(function() return s:transition(no, i % 2 == 0 and "PAID" or "FAILED", { key = "k" .. i }) end)
      end
      local ok = 0
      for i = 1, 100 do
        local _, st = hs[i]:wait(20000)
        if st == "ok" then ok = ok + 1 else assert.matches("^illegal transition ", st) end
      end
      assert.equal(1, ok)
      assert.equal(2, assert(s:get(no)).version)
    end)

    it("runs on_enter hooks after the transition and retries a failing one", function()
      local calls = 0
      local done
      order.on_enter("PAID", function(o, ev)
        calls = calls + 1
        if calls < 3 then error("hook fails on purpose") end
        done = { o.state, ev.from, ev.to, ev.key }
      end)
      local no = new_no()
      new_order(s, no)
      move(s, no, { "PAYING" })
      assert(s:transition(no, "PAID", { key = "hooked" }))
      H.wait_until(function() return done end, 10, "the hook to succeed")
      assert.equal(3, calls)
      assert.same({ "PAID", "PAYING", "PAID", "hooked" }, done)
      assert(s:transition(no, "PAID", { key = "hooked" })) -- duplicate: no hook
      wxd.sleep(50)
      assert.equal(3, calls)
      order.hooks{ on_enter = { PAID = function() end } }
    end)

    it("hands each change to the publisher in embedded mode", function()
      local got = {}
      order.set_publisher(function(topic, text) got[#got + 1] = { topic, text } end)
      local no = new_no()
      new_order(s, no)
      move(s, no, { "PAYING" })
      s:transition(no, "PAYING", { key = "path-1-PAYING" }) -- a duplicate publishes nothing
      order.set_publisher(nil)
      if b.name == "redis" then
        assert.same({}, got) -- the script publishes (see 22-order_spec)
        return
      end
      assert.equal(1, #got)
      assert.equal("order/" .. no, got[1][1])
      local ev = require("cjson").decode(got[1][2])
      assert.same({ out_trade_no = no, from = "CREATED", state = "PAYING", version = 1, event = "E", at = ev.at }, ev)
      assert.is_true(ev.at > 1.7e12)
    end)

    it("closes unpaid orders after close_after", function()
      local cfg = b.cfg()
      cfg.close_after = 0.2
      local c = order.new(cfg)
      local no, paid = new_no(), new_no()
      new_order(c, no)
      new_order(c, paid)
      move(c, paid, { "PAYING", "PAID" })
      H.wait_until(function()
        c:close_due(1000)
        return c:get(no).state == "CLOSED"
      end, 5, "the order to close")
      assert.equal("PAID", c:get(paid).state)
      local h = c:get(no).history[1]
      assert.equal("AUTO_CLOSE", h.event)
    end)

    it("raises on programmer errors", function()
      assert.has_error(function() s:transition("x", "NOPE", { key = "k" }) end)
      assert.has_error(function() s:transition("x", "PAID", {}) end)
      assert.has_error(function() s:transition("x", "PAID", { key = "k", data = { f = print } }) end)
      assert.has_error(function() s:create{ out_trade_no = "x", amount = 1.5 } end)
      assert.has_error(function() s:create{ out_trade_no = "", amount = 1 } end)
      assert.has_error(function() order.on_enter("NOPE", function() end) end)
    end)
  end)
end

describe("wxd.order journal", function()
  -- Each run is its own `wxd script` process: a journal is opened once per
  -- process, so replay needs a new one.
  local function script(path, body)
    local f = tmp .. "/s" .. new_no() .. ".lua"
    H.write_file(f, "local order = require 'wxd.order'\nlocal s = order.new{ journal = '" .. path .. "' }\n" .. body)
    local out, code = H.sh(H.WXD .. " script " .. f)
    return out, code
  end

  it("replays orders in a new process, and survives a torn tail", function()
    local j = tmp .. "/replay.journal"
    local out, code = script(j, [[
      for i = 1, 20 do
        assert(s:create{ out_trade_no = "R" .. i, amount = i })
        assert(s:transition("R" .. i, "PAYING", { key = "p" }))
        if i % 2 == 0 then assert(s:transition("R" .. i, "PAID", { key = "n", data = { i = i } })) end
      end
      assert(s:transition("R1", "CLOSED", { key = "c" }))
      assert(s:transition("R1", "PAID", { key = "late" }) == nil)
      print("WROTE")
    ]])
    assert.equal(0, code, out)
    assert.matches("WROTE", out)
    -- The journal keeps zero-filled space after its last record: a crash
    -- inside a write leaves the torn bytes right after that record.
    local good = H.journal_records(H.read_file(j))
    -- A half record (the first 30 bytes of a real one), then garbage.
    H.write_file(j, good .. good:sub(1, 30))
    local check = [[
      for i = 1, 20 do
        local o = assert(s:get("R" .. i))
        local want = i == 1 and "CLOSED" or (i % 2 == 0 and "PAID" or "PAYING")
        assert(o.state == want, "R" .. i .. " " .. o.state)
        if i % 2 == 0 then assert(o.history[2].data.i == i) end
      end
      assert(#assert(s:get("R1")).late == 1)
      print("INTACT")
    ]]
    out, code = script(j, check .. [[
      assert(s:create{ out_trade_no = "AFTER", amount = 7 })
    ]])
    assert.equal(0, code, out)
    assert.matches("INTACT", out)
    assert.matches("ignored a torn or corrupt tail of 30 bytes", out, 1, true)
    -- Garbage with a plausible length and a wrong checksum.
    H.write_file(j, H.journal_records(H.read_file(j)) .. "\16\0\0\0\1\2\3\4" .. string.rep("x", 16))
    out, code = script(j, check .. [[
      assert(s:get("AFTER").amount == 7)
      print("AFTER OK")
    ]])
    assert.equal(0, code, out)
    assert.matches("AFTER OK", out)
    assert.matches("ignored a torn or corrupt tail of 24 bytes", out, 1, true)
    -- Compaction dropped the tail: the journal replays cleanly now.
    out, code = script(j, check)
    assert.equal(0, code, out)
    assert.is_nil(out:find("torn", 1, true))
  end)

  it("commits into zero-filled space kept ahead, and drops a torn record there", function()
    local j = tmp .. "/ahead.journal"
    -- Commits overwrite space zero-filled at open: the file's size does not
    -- change with them (so fdatasync has no size to persist).
    local out, code = script(j, [[
      local function size() local f = assert(io.open("]] .. j .. [[", "rb")) local n = f:seek("end") f:close() return n end
      assert(s:create{ out_trade_no = "Z0", amount = 1 })
      local before = size()
      for i = 1, 50 do
        assert(s:create{ out_trade_no = "Z" .. i, amount = i })
        assert(s:transition("Z" .. i, "PAYING", { key = "p" }))
      end
      print("SIZES " .. before .. " " .. size())
    ]])
    assert.equal(0, code, out)
    local before, after = out:match("SIZES (%d+) (%d+)")
    assert.equal(before, after)
    assert.is_true(tonumber(after) >= 4 * 1024 * 1024)
    -- A crash inside a write: the torn bytes sit right after the last
    -- record, followed by the zero-filled space.
    local data = H.read_file(j)
    local records = H.journal_records(data)
    local torn = records:sub(1, 25)
    H.write_file(j, records .. torn .. string.rep("\0", #data - #records - #torn))
    out, code = script(j, [[
      for i = 1, 50 do assert(s:get("Z" .. i).state == "PAYING") end
      print("ALL THERE")
    ]])
    assert.equal(0, code, out)
    assert.matches("ALL THERE", out)
    assert.matches("ignored a torn or corrupt tail of", out, 1, true)
    -- Compaction dropped it: the next start replays cleanly.
    out, code = script(j, 'assert(s:get("Z50")) print("CLEAN")')
    assert.equal(0, code, out)
    assert.matches("CLEAN", out)
    assert.is_nil(out:find("torn", 1, true))
  end)

  it("refuses changes after a failed write, and keeps what it acknowledged", function()
    local j = tmp .. "/full.journal"
    -- A file size limit makes the journal's write fail (EFBIG; SIGXFSZ ignored).
    local f = tmp .. "/full" .. new_no() .. ".lua"
    H.write_file(f, "local order = require 'wxd.order'\nlocal s = order.new{ journal = '" .. j .. "' }\n" .. [[
      local acked = 0
      for i = 1, 10000 do
        local o, err = s:create{ out_trade_no = "F" .. i, amount = i, description = string.rep("d", 200) }
        if not o then
          print("FAILED " .. err)
          break
        end
        acked = i
      end
      local o, err = s:create{ out_trade_no = "G1", amount = 1 }
      print("AGAIN " .. tostring(o) .. " " .. tostring(err))
      print("ACKED " .. acked)
    ]])
    local out = H.sh("trap '' XFSZ; ulimit -f 64; " .. H.WXD .. " script " .. f)
    assert.matches("FAILED journal: File too large", out, 1, true)
    assert.matches("AGAIN nil journal: File too large", out, 1, true)
    local acked = assert(tonumber(out:match("ACKED (%d+)")), out)
    assert.is_true(acked > 10)
    local check = tmp .. "/check-full.lua"
    H.write_file(check, "local order = require 'wxd.order'\nlocal s = order.new{ journal = '" .. j .. "' }\n"
      .. "for i = 1, " .. acked .. " do assert(s:get('F' .. i).amount == i) end\nprint('ALL THERE')")
    local out2, code = H.sh(H.WXD .. " script " .. check)
    assert.equal(0, code, out2)
    assert.matches("ALL THERE", out2)
  end)

  it("refuses a journal whose records contradict each other", function()
    local j = tmp .. "/bad.journal"
    local out, code = script(j, [[
      assert(s:create{ out_trade_no = "B1", amount = 1 })
      assert(s:transition("B1", "PAYING", { key = "p" }))
    ]])
    assert.equal(0, code, out)
    local data = H.read_file(j)
    -- Drop the create record (its length is the first u32): the transition
    -- then names an unknown order.
    local len = data:byte(1) + data:byte(2) * 256
    H.write_file(j, data:sub(9 + len))
    out, code = script(j, "print('OPENED')")
    assert.is_not.equal(0, code)
    assert.matches("inconsistent record for B1", out, 1, true)
  end)
end)
