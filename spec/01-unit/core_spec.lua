-- The native core module and the coroutine mechanism, from inside wxd.
local wxd = require "wxd"
local H = require "helpers"

describe("wxd.sleep", function()
  it("suspends the running coroutine for about the given time", function()
    local t0 = wxd.monotonic_ms()
    wxd.sleep(30)
    local dt = wxd.monotonic_ms() - t0
    assert.is_true(dt >= 29, "slept " .. dt .. " ms")
  end)

  it("accepts 0", function()
    wxd.sleep(0)
  end)

  it("raises on a bad argument (programmer error)", function()
    assert.has_error(function() wxd.sleep(-1) end)
    assert.has_error(function() wxd.sleep("soon") end)
  end)

  it("raises a clear error inside the user's own coroutine", function()
    local co = coroutine.create(function() wxd.sleep(1) end)
    local ok, err = coroutine.resume(co)
    assert.is_false(ok)
    assert.truthy(err:find("cannot wait here", 1, true), err)
  end)
end)

describe("wxd clocks", function()
  it("now() is wall-clock seconds", function()
    assert.is_true(math.abs(wxd.now() - os.time()) < 2)
  end)

  it("monotonic_ms() only goes forward", function()
    local a = wxd.monotonic_ms()
    local b = wxd.monotonic_ms()
    assert.is_true(b >= a)
  end)

  it("worker_id() is -1 in a script", function()
    assert.equal(-1, wxd.worker_id())
  end)
end)

describe("wxd COMMAND --help", function()
  for _, cmd in ipairs({ "run", "dev", "check", "reload", "script" }) do
    it(cmd .. " --help and -h print the command's usage and exit 0", function()
      for _, flag in ipairs({ "--help", "-h" }) do
        local out, code = H.sh(H.WXD .. " " .. cmd .. " " .. flag)
        assert.equal(0, code, out)
        assert.equal("usage: wxd " .. cmd, out:match("^usage: wxd %a+"), out)
      end
      -- After other options too (run: before it would start serving).
      if cmd ~= "script" then
        local out, code = H.sh(H.WXD .. " " .. cmd .. " . --help")
        assert.equal(0, code, out)
        assert.matches("^usage: wxd " .. cmd, out)
      end
    end)
  end

  it("leaves --help after a script's FILE to the script", function()
    local dir = H.tmpdir()
    H.write_file(dir .. "/s.lua", "io.write(table.concat({ ... }, ' '))\n")
    local out, code = H.sh(H.WXD .. " script " .. dir .. "/s.lua --help x")
    os.execute("rm -rf " .. dir)
    assert.equal(0, code, out)
    assert.equal("--help x", out)
  end)

  it("documents version and help in the main usage", function()
    local out, code = H.sh(H.WXD .. " --help")
    assert.equal(0, code)
    assert.matches("version             print the version", out, 1, true)
    assert.matches("wxd COMMAND --help", out, 1, true)
    assert.matches("^wxd %d+%.%d+%.%d+", (H.sh(H.WXD .. " version")))
  end)
end)

describe("wxd script", function()
  local dir
  before_each(function() dir = H.tmpdir() end)
  after_each(function() os.execute("rm -rf " .. dir) end)

  it("passes arguments and exits 0", function()
    H.write_file(dir .. "/s.lua", "local a, b = ...\nio.write(arg[0], ' ', a, ' ', b, ' ', arg[2])\n")
    local out, code = H.sh(H.WXD .. " script " .. dir .. "/s.lua one two")
    assert.equal(0, code)
    assert.equal(dir .. "/s.lua one two two", out)
  end)

  it("exits 1 with a traceback when the script raises", function()
    H.write_file(dir .. "/s.lua", "local function f() error('nope') end\nf()\n")
    local out, code = H.sh(H.WXD .. " script " .. dir .. "/s.lua")
    assert.equal(1, code)
    assert.truthy(out:find("s.lua:1: nope", 1, true), out)
    assert.truthy(out:find("stack traceback", 1, true), out)
  end)

  it("runs the event loop: a sleep in the main chunk works", function()
    H.write_file(dir .. "/s.lua", "local wxd = require 'wxd'\nwxd.sleep(20)\nio.write('done')\n")
    local out, code = H.sh(H.WXD .. " script " .. dir .. "/s.lua")
    assert.equal(0, code)
    assert.equal("done", out)
  end)

  it("ends a bare coroutine.yield() at top level with an error instead of hanging", function()
    H.write_file(dir .. "/s.lua", "coroutine.yield()\n")
    local out, code = H.sh(H.WXD .. " script " .. dir .. "/s.lua")
    assert.equal(1, code)
    assert.truthy(out:find("nothing would resume it", 1, true), out)
  end)

  it("reports a missing file", function()
    local out, code = H.sh(H.WXD .. " script " .. dir .. "/missing.lua")
    assert.equal(1, code)
    assert.truthy(out:find("missing.lua", 1, true), out)
  end)
end)

describe("waiting where the coroutine cannot yield", function()
  it("raises before starting anything, inside a C function's callback", function()
    local ok, err = pcall(string.gsub, "x", "x", function() wxd.sleep(5) end)
    assert.is_false(ok)
    assert.truthy(err:find("cannot wait here", 1, true), err)
    -- Nothing was left behind to wake this coroutine later.
    local t0 = wxd.monotonic_ms()
    wxd.sleep(30)
    assert.is_true(wxd.monotonic_ms() - t0 >= 29)
  end)
end)
