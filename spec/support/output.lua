-- busted output handler: the terminal output, then one summary line
-- "N passed, N failed, N skipped" (errors count as failed, pending specs as
-- skipped) that spec/run.sh and CI read.
return function(options)
  local busted = require "busted"
  local isatty = require("term").isatty(io.stdout)
  local handler = require(isatty and "busted.outputHandlers.utfTerminal"
    or "busted.outputHandlers.plainTerminal")(options)
  busted.subscribe({ "suite", "end" }, function()
    io.write(string.format("\n%d passed, %d failed, %d skipped\n", handler.successesCount,
      handler.failuresCount + handler.errorsCount, handler.pendingsCount))
    io.flush()
    return nil, true
  end)
  return handler
end
