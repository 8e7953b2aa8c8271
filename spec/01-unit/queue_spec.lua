-- wxd.queue in one process, both backends: delivery and acknowledgement,
-- keys, backoff, dead letters, visibility timeouts, two consumers sharing a
-- queue; the journal's replay (new processes), torn tails and compaction.
local wxd = require "wxd"
local queue = require "wxd.queue"
local H = require "helpers"

local tmp = H.tmpdir()
local seq = 0
local function uniq(p)
  seq = seq + 1
  return string.format("%s%d_%d", p, math.floor(wxd.now() * 1000) % 100000000, seq)
end

local function backends()
  local list = { { "memory", function() return queue.new{ path = false, poll = 0.01 } end } }
  local url = os.getenv("WXD_TEST_REDIS_URL")
  if url and url ~= "" then
    list[2] = { "redis", function() return queue.new{ backend = "redis", redis = url, prefix = uniq("qs") .. ":",
      poll = 0.01 } end }
  end
  return list
end

for _, b in ipairs(backends()) do
  local backend, make = b[1], b[2]

  describe("wxd.queue (" .. backend .. ")", function()
    it("delivers every message once and keeps payload types", function()
      local q = make()
      local name = uniq("basic")
      for i = 1, 30 do
        local id, status = q:push(name, i % 2 == 0 and { n = i, list = { 1, 2 } } or ("text " .. i))
        assert.truthy(id, status)
        assert.equal("ok", status)
      end
      assert.equal(30, q:stats(name).pending)
      local got, infos = {}, {}
      local c = q:consume(name, function(payload, info)
        got[#got + 1] = payload
        infos[info.id] = (infos[info.id] or 0) + 1
        assert.equal(1, info.attempt)
        assert.is_true(info.first_at > 1.7e9)
        return true
      end)
      finally(function() c:stop() end)
      H.wait_until(function() return #got == 30 end, 10, "30 deliveries")
      local strings, tables = 0, 0
      for _, p in ipairs(got) do
        if type(p) == "string" then strings = strings + 1 assert.matches("^text %d+$", p)
        else tables = tables + 1 assert.same({ 1, 2 }, p.list) end
      end
      assert.equal(15, strings)
      assert.equal(15, tables)
      for _, n in pairs(infos) do assert.equal(1, n) end
      H.wait_until(function() return q:stats(name).delivered == 30 end, 5, "acks")
      local s = q:stats(name)
      assert.equal(0, s.pending)
      assert.equal(0, s.inflight)
      assert.equal(0, s.dead)
    end)

    it("adds a key once while it is pending, and again once delivered", function()
      local q = make()
      local name = uniq("keys")
      local id1, st1 = q:push(name, "a", { key = "k1" })
      local id2, st2 = q:push(name, "b", { key = "k1" })
      assert.equal("ok", st1)
      assert.equal("duplicate", st2)
      assert.equal(id1, id2)
      local got = {}
      local c = q:consume(name, function(p, info) got[#got + 1] = p .. ":" .. info.key return true end)
      finally(function() c:stop() end)
      H.wait_until(function() return #got == 1 end, 5, "one delivery")
      assert.same({ "a:k1" }, got)
      H.wait_until(function() return q:stats(name).delivered == 1 end, 5, "the ack")
      local id3, st3 = q:push(name, "c", { key = "k1" })
      assert.equal("ok", st3)
      assert.are_not.equal(id1, id3)
      H.wait_until(function() return #got == 2 end, 5, "the second delivery")
      assert.equal("c:k1", got[2])
    end)

    it("retries a failing handler with backoff, then acknowledges", function()
      local q = make()
      local name = uniq("retry")
      assert(q:push(name, { x = 1 }, { key = "r1" }))
      local attempts, errors, at = {}, {}, {}
      local c = q:consume(name, function(_, info)
        attempts[#attempts + 1] = info.attempt
        errors[#errors + 1] = info.last_error or ""
        at[#at + 1] = wxd.now()
        if info.attempt == 1 then error("boom") end
        if info.attempt == 2 then return nil, "upstream 503" end
        return true
      end, { backoff = { base = 0.2, max = 1 } })
      finally(function() c:stop() end)
      H.wait_until(function() return q:stats(name).delivered == 1 end, 10, "the third attempt")
      assert.same({ 1, 2, 3 }, attempts)
      assert.equal("", errors[1])
      assert.matches("boom", errors[2])
      assert.equal("upstream 503", errors[3])
      -- Backoff: at least half of base * 2^(n-1) between attempts (jitter is the upper half).
      assert.is_true(at[2] - at[1] >= 0.1 - 0.01, "first wait " .. (at[2] - at[1]))
      assert.is_true(at[3] - at[2] >= 0.2 - 0.01, "second wait " .. (at[3] - at[2]))
    end)

    it("puts a poison message in the dead-letter list after max_attempts", function()
      local q = make()
      local name = uniq("poison")
      assert(q:push(name, { bad = true }, { key = "p1" }))
      assert(q:push(name, "good"))
      local calls, good = 0, 0
      local c = q:consume(name, function(p)
        if p == "good" or p == "again" then good = good + 1 return true end
        calls = calls + 1
        return false, "always fails"
      end, { max_attempts = 3, backoff = { base = 0.01, max = 0.05 } })
      finally(function() c:stop() end)
      H.wait_until(function() return q:stats(name).dead == 1 end, 10, "the dead letter")
      assert.equal(3, calls)
      H.wait_until(function() return good == 1 end, 5, "the good message")
      local dead = q:dead(name)
      assert.equal(1, #dead)
      assert.same({ bad = true }, dead[1].payload)
      assert.equal("p1", dead[1].key)
      assert.equal(3, dead[1].attempts)
      assert.equal("always fails", dead[1].last_error)
      assert.is_true(dead[1].at > 1.7e9)
      -- Dead, it no longer holds its key.
      local _, status = q:push(name, "again", { key = "p1" })
      assert.equal("ok", status)
      -- And nothing more is delivered of it.
      H.wait_until(function() return good == 2 end, 5, "the new message of that key")
      assert.equal(3, calls)
    end)

    it("redelivers a message whose consumer never answers (visibility timeout)", function()
      local q = make()
      local name = uniq("vis")
      assert(q:push(name, "m", { key = "v1" }))
      local attempts, done = {}, false
      local c = q:consume(name, function(_, info)
        attempts[#attempts + 1] = info.attempt
        if info.attempt == 1 then
          wxd.sleep(1500) -- hangs past its visibility; its late "failure" must not count
          done = true
          return false, "late"
        end
        return true
      end, { visibility = 0.3, backoff = { base = 0.01, max = 0.01 } })
      finally(function() c:stop() end)
      H.wait_until(function() return q:stats(name).delivered == 1 end, 10, "the redelivery")
      assert.same({ 1, 2 }, attempts)
      H.wait_until(function() return done end, 5, "the hung delivery to end")
      wxd.sleep(50)
      local s = q:stats(name)
      assert.equal(1, s.delivered)
      assert.equal(0, s.pending + s.inflight + s.dead)
      assert.same({ 1, 2 }, attempts)
    end)

    it("gives each message to one of two consumers at a time", function()
      local q = make()
      local name = uniq("two")
      local seen, by = {}, { 0, 0 }
      local function handler(who)
        return function(p)
          seen[p] = (seen[p] or 0) + 1
          by[who] = by[who] + 1
          wxd.sleep(math.random(0, 5))
          return true
        end
      end
      local c1 = q:consume(name, handler(1), { concurrency = 3 })
      local c2 = q:consume(name, handler(2), { concurrency = 3 })
      finally(function() c1:stop() c2:stop() end)
      for i = 1, 200 do assert(q:push(name, "m" .. i)) end
      H.wait_until(function() return q:stats(name).delivered == 200 end, 20, "200 deliveries")
      for i = 1, 200 do assert.equal(1, seen["m" .. i], "m" .. i) end
      assert.is_true(by[1] > 0 and by[2] > 0, "both consumers worked: " .. by[1] .. "/" .. by[2])
    end)

    it("delays a message pushed with delay", function()
      local q = make()
      local name = uniq("delay")
      local t0 = wxd.now()
      assert(q:push(name, "later", { delay = 0.3 }))
      local at
      local c = q:consume(name, function() at = wxd.now() return true end)
      finally(function() c:stop() end)
      H.wait_until(function() return at end, 5, "the delayed delivery")
      assert.is_true(at - t0 >= 0.29, "delivered after " .. (at - t0))
    end)

    it("raises on programmer errors", function()
      local q = make()
      assert.has_error(function() q:push("", "x") end)
      assert.has_error(function() q:push("a", 42) end)
      assert.has_error(function() q:push("a", "x", { key = 5 }) end)
      assert.has_error(function() q:push("a", "x", { delay = -1 }) end)
      assert.has_error(function() q:consume("a", "nope") end)
      assert.has_error(function() q:consume("a", function() end, { bogus = 1 }) end)
      assert.has_error(function() queue.new{ backend = "nope" } end)
    end)
  end)
end

describe("wxd.queue journal", function()
  -- Each run is its own `wxd script` process: a journal is opened once per
  -- process, so replay needs a new one.
  local function script(path, body, extra)
    seq = seq + 1
    local f = tmp .. "/s" .. seq .. ".lua"
    H.write_file(f, "local wxd = require 'wxd'\nlocal queue = require 'wxd.queue'\n"
      .. "local q = queue.new{ path = '" .. path .. "', poll = 0.01" .. (extra or "") .. " }\n" .. body)
    return H.sh(H.WXD .. " script " .. f .. " 2>&1")
  end

  -- Consumes until `n` messages were handled, then prints them in order.
  local CONSUME = [[
    local got = {}
    local c = q:consume("jq", function(p, info)
      got[#got + 1] = p .. "@" .. info.attempt
      if p:find("fail") then return false, "nope" end
      return true
    end, { max_attempts = 2, backoff = { base = 0.01, max = 0.01 } })
    while #got < N do wxd.sleep(10) end
    c:stop()
    wxd.sleep(50)
    table.sort(got)
    print("GOT " .. table.concat(got, ","))
    local s = q:stats("jq")
    print(string.format("STATS pending=%d dead=%d", s.pending, s.dead))
  ]]

  it("keeps pending messages, attempts and dead letters across processes, and survives a torn tail", function()
    local j = tmp .. "/replay.journal"
    local out, code = script(j, [[
      for i = 1, 6 do assert(q:push("jq", "m" .. i, { key = "k" .. i })) end
      assert(q:push("jq", "fail1"))
      print("PUSHED")
    ]])
    assert.equal(0, code, out)
    assert.matches("PUSHED", out)
    -- A second process delivers three of them, and fail1 once (it fails).
    out, code = script(j, [[
      local got, n = {}, 0
      local c = q:consume("jq", function(p, info)
        if p == "fail1" then n = n + 1 return false, "nope" end
        if #got >= 3 then wxd.sleep(1e6) end -- these three stay in flight at exit
        got[#got + 1] = p
        return true
      end, { max_attempts = 2, backoff = { base = 30, max = 30 }, concurrency = 10 })
      while #got < 3 or n < 1 do wxd.sleep(10) end
      assert(q:push("flush", "x")) -- durable, so is every record before it
      print("ACKED " .. #got)
      io.stdout:flush()
      -- A crash: no shutdown, the three hung deliveries still in flight.
      local pid = tonumber(io.open("/proc/self/stat"):read("*a"):match("^(%d+)"))
      require("wxd.core").kill(pid, "KILL")
      wxd.sleep(5000)
    ]])
    assert.is_not.equal(0, code, out)
    assert.matches("ACKED 3", out)
    -- A torn write: the first 21 bytes of a record where the next one goes
    -- (in the zero-filled space after the last record).
    local good = H.journal_records(H.read_file(j))
    H.write_file(j, good .. good:sub(1, 21))
    -- The third process sees the other three (in flight at the exit: due
    -- again) and fail1 with one attempt left, after its backoff... which a
    -- restart does not shorten: so only the three come now.
    out, code = script(j, CONSUME:gsub("N", "3"))
    assert.equal(0, code, out)
    assert.matches("ignored a torn or corrupt tail of 21 bytes", out, 1, true)
    local got = out:match("GOT ([^\n]+)")
    assert.truthy(got, out)
    local names = {}
    for p in got:gmatch("(m%d)@2") do names[#names + 1] = p end
    assert.equal(3, #names, got)
    assert.matches("STATS pending=1 dead=0", out, 1, true)
  end)

  it("compacts the journal while running and replays the compacted file", function()
    local j = tmp .. "/compact.journal"
    local out, code = script(j, [[
      local n = 0
      local c = q:consume("jq", function() n = n + 1 return true end, { concurrency = 20 })
      for i = 1, 600 do assert(q:push("jq", string.rep("x", 100) .. i)) end
      while n < 600 do wxd.sleep(10) end
      -- How big the journal is depends on when the last compaction came
      -- (the next one waits for 4 times its size): so, with everything
      -- delivered, go on until one more compaction has left only what is
      -- live, a few messages at most.
      local before, k = q:stats("jq").compactions, 0
      while q:stats("jq").compactions == before do
        k = k + 1
        if k > 20000 then error("no compaction in 20000 more pushes") end
        assert(q:push("jq", string.rep("y", 100) .. k))
      end
      while n < 600 + k do wxd.sleep(10) end
      c:stop()
      for i = 1, 5 do assert(q:push("jq", "left" .. i)) end
      local s = q:stats("jq")
      print("COMPACTIONS " .. s.compactions)
    ]], ", compact_bytes = 8192")
    assert.equal(0, code, out)
    assert.is_true(tonumber(out:match("COMPACTIONS (%d+)")) > 0, out)
    local records = #H.journal_records(H.read_file(j))
    assert.is_true(records < 8192 * 4, "journal records of " .. records .. " bytes")
    out, code = script(j, CONSUME:gsub("N", "5"))
    assert.equal(0, code, out)
    assert.matches("GOT left1@1,left2@1,left3@1,left4@1,left5@1", out, 1, true)
  end)
end)
