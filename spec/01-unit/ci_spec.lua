-- CI is honest: a non-zero exit fails it even after a green summary line.
-- .ci/lib.sh holds the step functions .ci/run uses; spec/run.sh checks what
-- happens after busted's summary. Both are run here for real.
local H = require "helpers"

local function bash(script)
  local f = os.tmpname()
  H.write_file(f, script)
  local out, code = H.sh("bash " .. f)
  os.remove(f)
  return out, code
end

local function last_line(out) return out:match("([^\n]*)\n*$") end

describe(".ci/lib.sh", function()
  it("fails a step that prints a green summary and then exits non-zero", function()
    local out, code = bash([[
      . .ci/lib.sh
      ci_suite fake bash -c 'echo "3 passed, 0 failed, 0 skipped"; exit 1'
      ci_summary ]])
    assert.are_not.equal(0, code, out)
    assert.matches("fake exited with 1 after a summary with no failure", out, 1, true)
    assert.equal("3 passed, 1 failed, 0 skipped", last_line(out))
  end)

  it("fails a step without a summary line, and adds up the ones with one", function()
    local out, code = bash([[
      . .ci/lib.sh
      ci_suite one bash -c 'echo "5 passed, 0 failed, 2 skipped"'
      ci_suite two bash -c 'echo "Segmentation fault"; exit 139'
      ci_summary ]])
    assert.are_not.equal(0, code, out)
    assert.matches("two ended (exit 139) without a summary line", out, 1, true)
    assert.equal("5 passed, 1 failed, 2 skipped", last_line(out))
  end)

  it("passes when every step passed", function()
    local out, code = bash([[
      . .ci/lib.sh
      ci_suite one bash -c 'echo "5 passed, 0 failed, 0 skipped"'
      ci_summary ]])
    assert.equal(0, code, out)
    assert.equal("5 passed, 0 failed, 0 skipped", last_line(out))
  end)
end)

describe("spec/run.sh", function()
  local dir
  before_each(function() dir = H.tmpdir() end)
  after_each(function() os.execute("rm -rf " .. dir) end)

  it("exits non-zero when the runner crashes after its summary", function()
    -- wxd itself, but the process running the specs dies of SIGSEGV once
    -- it printed the summary.
    H.write_file(dir .. "/wxd", string.format([[#!/bin/sh
if [ "$1" = script ]; then %q "$@"; kill -SEGV $$; fi
exec %q "$@"
]], H.WXD, H.WXD))
    os.execute("chmod +x " .. dir .. "/wxd")
    local out, code = H.sh("WXD=" .. dir .. "/wxd spec/run.sh spec/01-unit/rockspec_spec.lua")
    assert.are_not.equal(0, code, out)
    assert.matches("spec runner exited with 139 after its summary", out, 1, true)
    assert.matches("^%d+ passed, 1 failed, 0 skipped$", last_line(out))
  end)

  it("exits non-zero when a spec's server crashes after the summary, and CI fails with it", function()
    local out, code = bash([[
      . .ci/lib.sh
      ci_suite nested spec/run.sh spec/fixtures/ci/crash_after_summary_spec.lua
      ci_summary ]])
    assert.are_not.equal(0, code, out)
    assert.matches("1 passed, 0 failed, 0 skipped", out, 1, true) -- busted's own line was green
    -- A plain build dies of the signal; under make asan the sanitizer
    -- reports the SEGV and exits 86.
    local crashed = out:match("a wxd server started by a spec crashed %(pid %d+, exit ([^)]+)%)")
    assert.truthy(crashed == "139: signal 11" or (os.getenv("WXD_SANITIZED") and crashed == "86: a sanitizer report"),
      out)
    assert.equal("1 passed, 1 failed, 0 skipped", last_line(out))
  end)

  it("kills a spec's server left running, and fails", function()
    H.write_file(dir .. "/left_spec.lua", [[
      local H = require "helpers"
      it("starts a server and forgets it", function() H.start(H.app("basic")) end)
    ]])
    local out, code = H.sh("spec/run.sh " .. dir .. "/left_spec.lua")
    assert.are_not.equal(0, code, out)
    assert.matches("a wxd server started by a spec was left running %(pid (%d+)%): killed", out)
    local pid = out:match("left running %(pid (%d+)%)")
    assert.are_not.equal(0, select(2, H.sh("kill -0 " .. pid)), "the server is gone")
    assert.equal("1 passed, 1 failed, 0 skipped", last_line(out))
  end)
end)
