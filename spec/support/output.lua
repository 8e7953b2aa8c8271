-- busted output handler: the terminal output, then one summary line
-- "N passed, N failed" (errors count as failed) that CI reads.
return function(options)
  local busted = require "busted"
  local isatty = require("term").isatty(io.stdout)
  local handler = require(isatty and "busted.outputHandlers.utfTerminal"
    or "busted.outputHandlers.plainTerminal")(options)
  busted.subscribe({ "suite", "end" }, function()
    io.write(string.format("\n%d passed, %d failed\n", handler.successesCount,
      handler.failuresCount + handler.errorsCount))
    io.flush()
    return nil, true
  end)
  return handler
end
