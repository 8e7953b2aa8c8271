-- wxd.timer inside wxd script (the loop runs between specs' waits).
local wxd = require "wxd"
local timer = require "wxd.timer"

describe("wxd.timer", function()
  it("runs a function once after a delay", function()
    local ran = 0
    local t0 = wxd.monotonic_ms()
    local at
    local h = timer.after(30, function() ran = ran + 1; at = wxd.monotonic_ms() end)
    assert.is_true(h:active())
    wxd.sleep(80)
    assert.equal(1, ran)
    assert.is_true(at - t0 >= 29)
    assert.is_false(h:active(), "a one-shot timer is done after its run")
  end)

  it("repeats until cancelled", function()
    local n = 0
    local h = timer.every(10, function() n = n + 1 end)
    wxd.sleep(75)
    h:cancel()
    local seen = n
    assert.is_true(seen >= 3, "ran " .. seen .. " times")
    wxd.sleep(40)
    assert.equal(seen, n, "no run after cancel")
    assert.is_false(h:active())
    h:cancel() -- idempotent
  end)

  it("lets a run wait, and skips ticks instead of overlapping runs", function()
    local running, overlap, runs = 0, false, 0
    local h = timer.every(5, function()
      running = running + 1
      if running > 1 then overlap = true end
      runs = runs + 1
      wxd.sleep(20)
      running = running - 1
    end)
    wxd.sleep(100)
    h:cancel()
    wxd.sleep(30)
    assert.is_false(overlap)
    assert.is_true(runs >= 2 and runs <= 6, "runs: " .. runs)
  end)

  it("keeps a repeating timer going after an error in a run", function()
    local n = 0
    local h = timer.every(10, function()
      n = n + 1
      error("expected in this spec")
    end)
    wxd.sleep(60)
    h:cancel()
    assert.is_true(n >= 2)
  end)

  it("runs worker-bound jobs in a script (there are no workers)", function()
    local ran = false
    timer.after(1, function() ran = true end, { worker = 0 })
    wxd.sleep(20)
    assert.is_true(ran)
  end)

  it("keeps running when its handle is dropped", function()
    local n = 0
    do timer.after(10, function() n = n + 1 end) end
    collectgarbage()
    collectgarbage()
    wxd.sleep(40)
    assert.equal(1, n)
  end)

  it("survives its native module being opened again and again (one VM close hook each)", function()
    local H = require "helpers"
    local dir = H.tmpdir()
    -- More reopenings than a VM has hook slots: each module must register
    -- its cleanup once, or the script aborts.
    H.write_file(dir .. "/reopen.lua", [[
      for _ = 1, 12 do
        package.loaded["wxd.core.timer"] = nil
        package.loaded["wxd.core.redis"] = nil
        require "wxd.core.timer"
        require "wxd.core.redis"
      end
      require("wxd.timer").after(5, function() print("fired") end)
      print("reopened")
    ]])
    local out, code = H.sh(H.WXD .. " script " .. dir .. "/reopen.lua")
    H.sh("rm -rf " .. dir)
    assert.equal(0, code, out)
    assert.matches("reopened", out)
    assert.matches("fired", out)
  end)

  it("raises on bad arguments", function()
    assert.has_error(function() timer.after(-1, function() end) end)
    assert.has_error(function() timer.every(0, function() end) end)
    assert.has_error(function() timer.after(10, "not a function") end)
    assert.has_error(function() timer.every(10, function() end, "opts") end)
  end)
end)
