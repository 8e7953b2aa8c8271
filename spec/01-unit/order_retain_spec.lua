-- wxd.order retention: due orders are archived, forgotten in memory and in
-- the journal (memory backend), or expire (Redis keys). No wall clock: the
-- memory specs pass "now" to forget_due, and the Redis specs read the TTL
-- the transition script set.
local wxd = require "wxd"
local order = require "wxd.order"
local cjson = require "cjson.safe"
local H = require "helpers"

local tmp = H.tmpdir()
local run = tostring(math.floor(wxd.now() * 1000))
local DAY = 86400 * 1000

local seq = 0
local function new_path(name)
  seq = seq + 1
  return tmp .. "/" .. name .. seq
end

-- How to reach each state from CREATED, and what retention does to it.
local PATH = {
  CREATED = {}, PAYING = { "PAYING" }, PAID = { "PAYING", "PAID" }, FAILED = { "PAYING", "FAILED" },
  CONFIRMED = { "PAYING", "PAID", "CONFIRMED" }, CLOSED = { "CLOSED" },
  REFUNDING = { "PAYING", "PAID", "REFUNDING" }, REFUNDED = { "PAYING", "PAID", "REFUNDING", "REFUNDED" },
  REFUND_FAILED = { "PAYING", "PAID", "REFUNDING", "REFUND_FAILED" },
}
local CLASS = {
  FAILED = "final", CLOSED = "final", REFUNDED = "final",
  PAID = "settled", CONFIRMED = "settled", REFUND_FAILED = "settled",
  CREATED = "kept", PAYING = "kept", REFUNDING = "kept",
}

local function make(s, no, state, extra)
  local o, st = s:create{ out_trade_no = no, amount = 100, currency = "CNY", appid = "wxapp", mchid = "1900",
    payer_openid = "oOPENID", description = extra and 'say "hi"\n\t\\ 中文' or nil }
  assert(o, st)
  for i, to in ipairs(PATH[state]) do
    assert(s:transition(no, to, { key = "k" .. i .. "-" .. to, event = "E" .. i, data = { n = i, to = to } }))
  end
  return assert(s:get(no))
end

local function archive_lines(path)
  local data = H.read_file(path)
  local out = {}
  if not data then return out end
  for line in data:gmatch("([^\n]*)\n") do
    local o = assert(cjson.decode(line), "a JSON line: " .. line)
    out[#out + 1] = o
  end
  assert.equal("\n", data:sub(-1), "the archive ends with a whole line")
  return out
end

-- Runs a Lua body in a new `wxd script` process (a journal is opened once
-- per process: replay needs a new one); returns output and exit code.
local function script(body)
  local f = new_path("script") .. ".lua"
  H.write_file(f, "local order = require 'wxd.order'\nlocal cjson = require 'cjson.safe'\n" .. body)
  return H.sh(H.WXD .. " script " .. f)
end

describe("wxd.order retention (memory)", function()
  it("forgets final orders after final_days and settled ones after settled_days, keeps the rest, and "
    .. "archives exactly what it forgot", function()
    local j, a = new_path("rules.journal"), new_path("rules.archive")
    local s = order.new{ backend = "memory", journal = j, retain = { final_days = 1, settled_days = 10, archive = a } }
    local before, nos = {}, {}
    for state in pairs(PATH) do
      for i = 1, 3 do
        local no = "R" .. state .. i
        before[no] = make(s, no, state, i == 2)
        nos[#nos + 1] = no
      end
    end
    -- A late event on a final order is kept with it (and archived with it).
    assert.is_nil(s:transition("RCLOSED1", "PAID", { key = "late-pay" }))
    before.RCLOSED1 = assert(s:get("RCLOSED1"))
    assert.equal(1, #before.RCLOSED1.late)
    local t0 = math.floor(wxd.now() * 1000)
    local function gone() local g = {} for _, no in ipairs(nos) do g[no] = s:get(no) == nil end return g end

    -- Half a day later: nothing is due.
    assert.equal(0, s:forget_due(1000, t0 + DAY / 2))
    for no, g in pairs(gone()) do assert.is_false(g, no) end
    assert.is_nil(H.read_file(a))

    -- Two days later: the final ones go, in one sweep of small batches.
    local stats0 = s:stats()
    local n, err, total
    n = 0
    repeat
      local k = assert(s:forget_due(2, t0 + 2 * DAY))
      n = n + k
    until k < 2
    assert.equal(9, n)
    for no, g in pairs(gone()) do
      assert.equal(CLASS[before[no].state] == "final", g, no)
    end
    local o, msg = s:get("RCLOSED1")
    assert.is_nil(o)
    assert.equal("not found", msg)
    assert.same({ nil, "not found" }, { s:transition("RFAILED1", "PAID", { key = "again" }) })
    assert.equal(stats0.forgotten + 9, s:stats().forgotten)
    assert.equal(stats0.orders - 9, s:stats().orders)

    -- Eleven days later: the settled ones as well; a year later the kept
    -- ones are still there.
    total, err = s:sweep(t0 + 11 * DAY)
    assert.equal(9, total, err)
    assert.equal(0, s:sweep(t0 + 10000 * DAY))
    for no, g in pairs(gone()) do
      assert.equal(CLASS[before[no].state] ~= "kept", g, no)
      if not g then assert.same(before[no], s:get(no)) end
    end

    -- The archive: one line per forgotten order, as get returned it.
    local lines = archive_lines(a)
    assert.equal(18, #lines)
    local seen = {}
    for _, line in ipairs(lines) do
      assert.is_nil(seen[line.out_trade_no], "archived once")
      seen[line.out_trade_no] = true
      assert.same(before[line.out_trade_no], line)
    end
    for no, o2 in pairs(before) do assert.equal(CLASS[o2.state] ~= "kept", seen[no] == true, no) end
    assert.equal('say "hi"\n\t\\ 中文', before.RCLOSED2.description)

    -- A forgotten number may be used again: a new order.
    local again = assert(s:create{ out_trade_no = "RCLOSED1", amount = 5, currency = "CNY" })
    assert.equal(0, again.version)
    assert.equal(5, assert(s:get("RCLOSED1")).amount)
  end)

  it("does not bring forgotten orders back at replay, and compaction drops them from the journal", function()
    local j, a = new_path("replay.journal"), new_path("replay.archive")
    -- Everything in the child processes: this process never opens the journal.
    local out, code = script([[
      local s = order.new{ journal = "]] .. j .. [[", retain = { final_days = 1, settled_days = 10, archive = "]]
      .. a .. [[" } }
      for i = 1, 30 do
        assert(s:create{ out_trade_no = "P" .. i, amount = i, currency = "CNY" })
        assert(s:transition("P" .. i, "PAYING", { key = "p", data = { i = i } }))
        if i % 3 == 0 then assert(s:transition("P" .. i, "FAILED", { key = "f" }))
        elseif i % 3 == 1 then assert(s:transition("P" .. i, "PAID", { key = "n", data = { tid = "T" .. i } })) end
      end
      local now = require("wxd").now() * 1000
      print("FORGOT " .. assert(s:sweep(now + 2 * 86400000)))
      -- After the FORGET records, more changes to the orders that stay.
      assert(s:transition("P1", "CONFIRMED", { key = "c" }))
      assert(s:create{ out_trade_no = "P3", amount = 333, currency = "CNY" })
      local keep = {}
      for i = 1, 30 do keep[#keep + 1] = cjson.encode(s:get("P" .. i) or { gone = i }) end
      print("STATE " .. table.concat(keep, "|"))
    ]])
    assert.equal(0, code, out)
    assert.matches("FORGOT 10", out, 1, true)
    local want = assert(out:match("STATE ([^\n]*)"))
    assert.equal(10, #archive_lines(a))
    local check = [[
      local s = order.new{ journal = "]] .. j .. [[", retain = false }
      local keep = {}
      for i = 1, 30 do keep[#keep + 1] = cjson.encode(s:get("P" .. i) or { gone = i }) end
      print("STATE " .. table.concat(keep, "|"))
    ]]
    -- JSON texts from two processes: compared decoded (key order differs).
    local function same_state(got)
      local a_, b_ = {}, {}
      for t in want:gmatch("[^|]+") do a_[#a_ + 1] = assert(cjson.decode(t)) end
      for t in assert(got, "a STATE line"):gmatch("[^|]+") do b_[#b_ + 1] = assert(cjson.decode(t)) end
      assert.same(a_, b_)
    end
    out, code = script(check)
    assert.equal(0, code, out)
    same_state(out:match("STATE ([^\n]*)"))
    assert.matches('{"gone":6}', want, 1, true)
    assert.matches('"amount":333', want, 1, true)
    -- The replay compacted the journal: the forgotten orders left it.
    local records = H.journal_records(H.read_file(j))
    assert.is_nil(records:find("P6", 1, true))
    assert.is_truthy(records:find("P7", 1, true))
    out, code = script(check)
    assert.equal(0, code, out)
    same_state(out:match("STATE ([^\n]*)"))
  end)

  it("refuses a FORGET record that contradicts the order", function()
    local j = new_path("badforget.journal")
    local out, code = script([[
      local s = order.new{ journal = "]] .. j .. [[", retain = { archive = false } }
      assert(s:create{ out_trade_no = "B1", amount = 1, currency = "CNY" })
      assert(s:transition("B1", "CLOSED", { key = "c" }))
      assert(s:create{ out_trade_no = "B2", amount = 1, currency = "CNY" })
      assert(s:forget_due(10, require("wxd").now() * 1000 + 31 * 86400000) == 1)
    ]])
    assert.equal(0, code, out)
    -- Cut the transition record out (the second record): the FORGET then
    -- names a version the order never reached.
    local data = H.journal_records(H.read_file(j))
    local function rec_len(off) local b1, b2 = data:byte(off, off + 1) return 8 + b1 + b2 * 256 end
    local first = rec_len(1)
    local second = rec_len(first + 1)
    H.write_file(j, data:sub(1, first) .. data:sub(first + second + 1))
    out, code = script("order.new{ journal = '" .. j .. "' }:get('B1') print('OPENED')")
    assert.is_not.equal(0, code)
    assert.matches("inconsistent record for B1", out, 1, true)
  end)

  it("keeps the hash table right through many removals and inserts (a Lua table as the model)", function()
    local a = new_path("many.archive")
    local s = order.new{ backend = "memory", journal = false, retain = { archive = a, batch = 700 } }
    local st = s.impl.st
    local model = {} -- no -> state
    local N = 20000
    local pre = "M" .. run .. "-"
    for i = 1, N do
      local no = pre .. i
      assert(s:create{ out_trade_no = no, amount = i, currency = "CNY" })
      if i % 2 == 0 then
        assert(s:transition(no, "CLOSED", { key = "c" }))
        model[no] = "CLOSED"
      else
        model[no] = "CREATED"
      end
    end
    local total = assert(s:sweep(wxd.now() * 1000 + 31 * DAY))
    assert.equal(N / 2, total)
    for i = 2, N, 2 do model[pre .. i] = nil end
    assert.equal(N / 2, #archive_lines(a))
    -- Everything that stayed moves; forgotten numbers and new ones are created.
    for i = 1, N, 2 do
      local no = pre .. i
      assert.equal("CREATED", assert(s:get(no)).state)
      assert(s:transition(no, "PAYING", { key = "p" }))
      model[no] = "PAYING"
    end
    for i = 2, 2 * N, 2 do
      local no = pre .. i
      assert(s:create{ out_trade_no = no, amount = i, currency = "CNY" })
      model[no] = "CREATED"
    end
    for i = 1, 2 * N do
      local no = pre .. i
      local o = s:get(no)
      assert.equal(model[no], o and o.state, no)
      if o then assert.equal(i, o.amount) end
    end
    -- The closer's scan sees exactly the unpaid ones.
    local due = st:due(wxd.now() * 1000 + DAY, 10 * N)
    local unpaid = 0
    for _, state in pairs(model) do if state == "CREATED" or state == "PAYING" then unpaid = unpaid + 1 end end
    assert.equal(unpaid, #due)
    local seen = {}
    for _, no in ipairs(due) do
      assert.is_nil(seen[no])
      seen[no] = true
      assert.is_truthy(model[no], no)
    end
    -- A second round: forget every PAYING one that failed, then compare again.
    for i = 1, N, 4 do
      assert(s:transition(pre .. i, "FAILED", { key = "f" }))
      model[pre .. i] = nil
    end
    assert.equal(N / 4, assert(s:sweep(wxd.now() * 1000 + 31 * DAY)))
    for i = 1, 2 * N do
      local o = s:get(pre .. i)
      assert.equal(model[pre .. i], o and o.state, pre .. i)
    end
  end)

  it("forgets nothing and says why when the archive cannot be written", function()
    local a = tmp .. "/no-such-dir/orders.archive.jsonl"
    local s = order.new{ backend = "memory", journal = false, retain = { archive = a } }
    local no = "A" .. run
    assert(s:create{ out_trade_no = no, amount = 1, currency = "CNY" })
    assert(s:transition(no, "CLOSED", { key = "c" }))
    local forgotten = s:stats().forgotten
    local n, err = s:forget_due(10, wxd.now() * 1000 + 31 * DAY)
    assert.is_nil(n)
    assert.equal("archive " .. a .. ": No such file or directory", err)
    local total, err2, so_far = s:sweep(wxd.now() * 1000 + 31 * DAY)
    assert.is_nil(total)
    assert.equal(err, err2)
    assert.equal(0, so_far)
    assert.equal("CLOSED", assert(s:get(no)).state)
    assert.equal(forgotten, s:stats().forgotten)
  end)

  it("cuts a half-written archive back and forgets nothing, and refuses to forget after a journal failure",
    function()
    local a, j = new_path("full.archive"), new_path("full.journal")
    -- The archive already holds a torn line (a crash mid-write): the next
    -- lines start on a line of their own.
    H.write_file(a, string.rep("x", 1000))
    local f = new_path("full") .. ".lua"
    H.write_file(f, [[
      local order = require 'wxd.order'
      local now = require("wxd").now() * 1000
      local m = order.new{ journal = false, retain = { archive = "]] .. a .. [[" } }
      assert(m:create{ out_trade_no = "S1", amount = 1, currency = "CNY" })
      assert(m:transition("S1", "CLOSED", { key = "c" }))
      print("SMALL " .. tostring(m:forget_due(10, now + 31 * 86400000)))
      for i = 1, 400 do
        assert(m:create{ out_trade_no = "W" .. i, amount = i, currency = "CNY", description = string.rep("d", 200) })
        assert(m:transition("W" .. i, "CLOSED", { key = "c" }))
      end
      print("BIG " .. table.concat({ tostring(m:forget_due(400, now + 31 * 86400000)) }, " ", 1, 1) .. " "
        .. select(2, m:forget_due(400, now + 31 * 86400000)))
      print("STILL " .. m:stats().orders)
      -- The journal fails (the same size limit): then nothing is forgotten.
      local s = order.new{ journal = "]] .. j .. [[", retain = { archive = false } }
      for i = 1, 100000 do
        local o = s:create{ out_trade_no = "J" .. i, amount = i, description = string.rep("d", 200) }
        if not o then break end
        if not s:transition("J" .. i, "CLOSED", { key = "c" }) then break end
      end
      print("JOURNAL " .. tostring(select(2, s:forget_due(10, now + 31 * 86400000))))
    ]])
    local out = H.sh("trap '' XFSZ; ulimit -f 64; " .. H.WXD .. " script " .. f)
    assert.matches("SMALL 1", out, 1, true)
    assert.matches("BIG nil archive " .. a .. ": File too large", out, 1, true)
    assert.matches("STILL 400", out, 1, true)
    assert.matches("JOURNAL journal: File too large", out, 1, true)
    local data = H.read_file(a)
    local torn, first = data:match("^(x+)\n([^\n]*)\n$")
    assert.equal(1000, #torn, data:sub(1, 2000))
    assert.equal("S1", assert(cjson.decode(first)).out_trade_no)
  end)

  it("keeps everything with retain = false", function()
    local s = order.new{ backend = "memory", journal = false, retain = false }
    local no = "K" .. run
    make(s, no, "CLOSED")
    assert.equal(0, s:forget_due(10, wxd.now() * 1000 + 10000 * DAY))
    assert.equal(0, s:sweep(wxd.now() * 1000 + 10000 * DAY))
    assert.equal("CLOSED", assert(s:get(no)).state)
  end)

  it("checks its settings", function()
    local function bad(retain, msg)
      local ok, err = pcall(order.new, { backend = "memory", journal = false, retain = retain })
      assert.is_false(ok)
      assert.matches(msg, err, 1, true)
    end
    bad(5, "retain must be a table or false")
    bad(true, "retain must be a table or false")
    bad({ final_days = 0 }, "retain.final_days must be a number > 0")
    bad({ settled_days = -1 }, "retain.settled_days must be a number > 0")
    bad({ sweep_interval = "1h" }, "retain.sweep_interval must be a number > 0")
    bad({ final_days = 0 / 0 }, "retain.final_days must be a number > 0")
    bad({ final_days = math.huge }, "retain.final_days must be a number > 0")
    bad({ batch = 1.5 }, "retain.batch must be an integer > 0")
    bad({ archive = 5 }, "retain.archive must be a path or false")
    bad({ archive = "" }, "retain.archive must be a path or false")
    bad({ final_dayz = 3 }, "unknown retain setting final_dayz")
    local ok, err = pcall(order.new, { backend = "redis", redis = H.redis_url(), retain = { archive = "/tmp/x" } })
    assert.is_false(ok)
    assert.matches("retain.archive is for the memory backend", err, 1, true)
    local s = order.new{ backend = "memory", journal = false }
    assert.has_error(function() s:forget_due(0) end)
    assert.has_error(function() s:forget_due(10, "now") end)
    assert.has_error(function() s.impl.st:forget_due(0, 0, 0) end)
  end)
end)

describe("wxd.order retention (redis)", function()
  local redis = require "wxd.redis"
  local r = redis.new(H.redis_url())
  local prefix = "spec:retain:" .. run .. ":"
  local function pttl(no) return assert(r:call("PTTL", prefix .. "order:" .. no)) end

  it("sets each key's expiry from the state it enters", function()
    local s = order.new{ backend = "redis", redis = H.redis_url(), prefix = prefix,
      retain = { final_days = 30, settled_days = 400 } }
    for state, class in pairs(CLASS) do
      local no = "X" .. state
      make(s, no, state)
      local ttl = pttl(no)
      if class == "kept" then
        assert.equal(-1, ttl, state)
      else
        local want = (class == "final" and 30 or 400) * DAY
        assert.is_true(ttl <= want and ttl > want - 600000, state .. " " .. ttl)
      end
    end
    -- Back into a kept state: no expiry again (a refund of a paid order).
    assert(s:transition("XCONFIRMED", "REFUNDING", { key = "r" }))
    assert.equal(-1, pttl("XCONFIRMED"))
    assert(s:transition("XCONFIRMED", "REFUNDED", { key = "rd" }))
    assert.is_true(pttl("XCONFIRMED") <= 30 * DAY)
    -- A late event on a final order keeps the expiry it had.
    r:call("PEXPIRE", prefix .. "order:XCLOSED", 5 * DAY)
    assert.is_nil(s:transition("XCLOSED", "PAID", { key = "late" }))
    assert.equal(1, #assert(s:get("XCLOSED")).late)
    local ttl = pttl("XCLOSED")
    assert.is_true(ttl <= 5 * DAY and ttl > 5 * DAY - 600000, ttl)
  end)

  it("sets no expiry with retain = false or unset, and an expired order is not found", function()
    local s = order.new{ backend = "redis", redis = H.redis_url(), prefix = prefix .. "off:", retain = false }
    make(s, "OFF", "CLOSED")
    assert.equal(-1, assert(r:call("PTTL", prefix .. "off:order:OFF")))
    -- Unset: off in Redis mode (expiry deletes; there is no archive).
    local unset = order.new{ backend = "redis", redis = H.redis_url(), prefix = prefix .. "unset:" }
    make(unset, "UNSET", "CLOSED")
    make(unset, "UNSETP", "PAID")
    assert.equal(-1, assert(r:call("PTTL", prefix .. "unset:order:UNSET")))
    assert.equal(-1, assert(r:call("PTTL", prefix .. "unset:order:UNSETP")))
    assert.equal(0, s:forget_due(10))
    local short = order.new{ backend = "redis", redis = H.redis_url(), prefix = prefix .. "short:",
      retain = { final_days = 1e-7 } } -- about 9 ms
    make(short, "SHORT", "CLOSED")
    H.wait_until(function() return short:get("SHORT") == nil end, 10, "the order to expire")
    assert.same({ nil, "not found" }, { short:get("SHORT") })
  end)
end)
