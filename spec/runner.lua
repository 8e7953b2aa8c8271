-- Runs busted inside wxd (`wxd script spec/runner.lua [busted args]`), so
-- that specs can call the native primitives and wait on the event loop.
package.path = "./spec/?.lua;./lua/?.lua;./lua/?/init.lua;" .. package.path

-- busted ends with os.exit; turn that into a return so that wxd closes the
-- Lua state and its loop (the sanitizer build then sees no false leaks).
local EXIT = {}
local real_exit = os.exit
os.exit = function(code) -- luacheck: ignore 122
  if code == true or code == nil then code = 0 elseif code == false then code = 1 end
  error({ [EXIT] = code }, 0)
end

local ok, err = pcall(require("busted.runner"), { standalone = false })
os.exit = real_exit -- luacheck: ignore 122
if ok then return 0 end
if type(err) == "table" and err[EXIT] then return err[EXIT] ~= 0 and 1 or 0 end
-- busted signals failed specs by raising nil (it thinks it is a library
-- under Lua 5.1); anything else is a crash of the runner itself.
if err ~= nil then io.stderr:write(tostring(err), "\n") end
return 1
