local json = require "wxd.json"

-- Runs a python3 program over a file of lines; returns its output and code.
-- python3 is the independent implementation here: its json module and its
-- UTF-8 decoder (strict, and "replace" with one U+FFFD per maximal
-- ill-formed piece, as the Unicode standard recommends).
local function python(program, lines)
  local dir = os.tmpname()
  local f = assert(io.open(dir, "wb"))
  f:write(table.concat(lines, "\n"), "\n")
  f:close()
  local script = dir .. ".py"
  f = assert(io.open(script, "wb"))
  f:write(program)
  f:close()
  local p = assert(io.popen("python3 " .. script .. " " .. dir .. " 2>&1; echo \"rc=$?\""))
  local out = p:read("*a")
  p:close()
  os.remove(dir)
  os.remove(script)
  return out:gsub("rc=%d+%s*$", ""), tonumber(out:match("rc=(%d+)%s*$"))
end

local function hex(s)
  return (s:gsub(".", function(c) return string.format("%02x", c:byte()) end))
end

local function errors_of(fn, ...)
  local ok, err = pcall(fn, ...)
  assert.is_false(ok, "expected an error")
  return err
end

describe("wxd.json.encode", function()
  it("writes scalars, null and nil", function()
    assert.equal("null", json.encode(nil))
    assert.equal("null", json.encode(json.null))
    assert.equal("null", json.encode(require("cjson").null))
    assert.equal("true", json.encode(true))
    assert.equal("false", json.encode(false))
    assert.equal('"x"', json.encode("x"))
    assert.has_error(function() json.encode() end)
  end)

  it("writes integers exactly and other numbers in the fewest digits that read back the same", function()
    assert.equal("[0,-5,9007199254740994,1152921504606846976]", json.encode({ 0, -5, 2 ^ 53 + 2, 2 ^ 60 }))
    assert.equal("[0.1,0.3333333333333333,1.5,-2.5e-08,1e+300]", json.encode({ 0.1, 1 / 3, 1.5, -2.5e-8, 1e300 }))
    for _, v in ipairs({ 0.1, 1 / 3, math.pi, 2 ^ -1074, 1.7976931348623157e308, 123456.789, 2 ^ 63, -2 ^ 70 }) do
      assert.equal(v, json.decode(json.encode(v)))
    end
  end)

  it("refuses NaN and infinities, naming the place", function()
    assert.equal("wxd.json: cannot encode NaN or infinity at $.x[2]", errors_of(json.encode, { x = { 1, 0 / 0 } }))
    assert.equal("wxd.json: cannot encode NaN or infinity at $", errors_of(json.encode, math.huge))
    assert.equal("wxd.json: cannot encode NaN or infinity at $", errors_of(json.encode, -math.huge))
  end)

  it("escapes quotes, backslashes and control bytes, and leaves / and UTF-8 alone", function()
    assert.equal([["a\"b\\c/d"]], json.encode('a"b\\c/d'))
    assert.equal([["\b\f\n\r\t\u0000\u0001\u001f\u007f"]], json.encode("\b\f\n\r\t\0\1\31\127"))
    assert.equal('"\195\169 \240\159\152\128 \228\184\173 \239\191\189"', json.encode("é 😀 中 \239\191\189"))
  end)

  it("replaces each maximal invalid UTF-8 piece with U+FFFD, as python3 does", function()
    local samples = {
      "caf\233", "\255", "\254\255", "\128", "\128\191", "\192\175", "\193\191", "\224\128\175", "\224\159\191",
      "\237\160\128", "\237\191\191", "\240\128\128\128", "\240\159\152", "\240\159\152A", "\244\144\128\128",
      "\245\128\128\128", "\248\136\128\128\128", "\252\132\128\128\128\128", "\225\128", "\226\130",
      "a\195", "\195\169\195", "ok \226\130\172 \240\144\128\128 \244\143\191\191 \238\128\128",
    }
    -- And random bytes, more of them 8-bit than not.
    math.randomseed(20261203)
    for _ = 1, 500 do
      local b = {}
      for i = 1, math.random(1, 12) do
        b[i] = string.char(math.random() < 0.7 and math.random(128, 255) or math.random(0, 127))
      end
      samples[#samples + 1] = table.concat(b)
    end
    local lines = {}
    for i, s in ipairs(samples) do lines[i] = hex(s) .. " " .. json.encode(s) end
    local out, code = python([[
import json, sys
bad = 0
for line in open(sys.argv[1], "rb").read().decode("utf-8", errors="strict").splitlines():
    raw, ours = line.split(" ", 1)
    want = bytes.fromhex(raw).decode("utf-8", errors="replace")
    got = json.loads(ours)
    if got != want:
        bad += 1
        print("differs:", raw, ascii(got), ascii(want))
print("checked", len(open(sys.argv[1], "rb").read().splitlines()), "bad", bad)
]], lines)
    assert.equal(0, code, out)
    assert.truthy(out:find("checked " .. #samples .. " bad 0", 1, true), out)
    -- The replacement is written as an escape: a U+FFFD that was in the
    -- input stays raw, so the two can be told apart in a log.
    assert.equal('"caf\\ufffd"', json.encode("caf\233"))
    assert.equal('"\\ufffd\\ufffd"', json.encode("\192\175"))
  end)

  it("writes an empty table as {} and a marked one as []", function()
    assert.equal("{}", json.encode({}))
    assert.equal("[]", json.encode(json.array()))
    assert.equal("[]", json.encode(json.array({})))
    assert.equal('{"a":[]}', json.encode({ a = json.array() }))
    assert.equal('[1,"x",[2]]', json.encode({ 1, "x", { 2 } }))
    assert.equal("[1,2]", json.encode(json.array({ 1, 2 })))
  end)

  it("writes holes as null unless the array is excessively sparse", function()
    assert.equal("[1,null,3]", json.encode({ 1, nil, 3 }))
    assert.equal("[null,null,null,null,null,null,null,null,null,1]", json.encode({ [10] = 1 }))
    assert.equal("[null,null,null,null,1]", json.encode(json.array({ [5] = 1 })))
    local err = errors_of(json.encode, { orders = { [1] = "a", [100] = "b" } })
    assert.equal("wxd.json: cannot encode an excessively sparse array (largest index 100, 2 items) at $.orders:"
                 .. " fill the gaps, or use string keys for an object", err)
  end)

  it("refuses keys that fit neither an array nor an object", function()
    assert.equal("wxd.json: cannot encode a table with both array items and string keys at $",
                 errors_of(json.encode, { 1, 2, n = 2 }))
    assert.equal("wxd.json: cannot encode a table with both array items and string keys at $.t",
                 errors_of(json.encode, { t = { a = 1, [1] = 2 } }))
    assert.equal("wxd.json: cannot encode a table with the key 0 at $: array indexes are 1, 2, ...;"
                 .. " use string keys for an object", errors_of(json.encode, { [0] = "x" }))
    assert.truthy(errors_of(json.encode, { [1.5] = "x" }):find("with the key 1.5", 1, true))
    assert.equal("wxd.json: cannot encode a table with a boolean key at $", errors_of(json.encode, { [true] = 1 }))
    assert.equal("wxd.json: cannot encode an array (json.array) with string keys at $",
                 errors_of(json.encode, json.array({ a = 1 })))
  end)

  it("refuses values with no JSON form, naming the path", function()
    assert.equal("wxd.json: cannot encode a function at $.a.b[1]",
                 errors_of(json.encode, { a = { b = { function() end } } }))
    assert.equal('wxd.json: cannot encode a userdata at $["a b"]["c\\xff"][2].x',
                 errors_of(json.encode, { ["a b"] = { ["c\255"] = { 1, { x = io.stdout } } } }))
    assert.equal("wxd.json: cannot encode a thread at $", errors_of(json.encode, coroutine.create(print)))
    -- A deep path keeps its first 12 steps.
    local deep = { f = print }
    for _ = 1, 250 do deep = { deep } end
    assert.equal("wxd.json: cannot encode a function at $[1][1][1][1][1][1][1][1][1][1][1][1]...",
                 errors_of(json.encode, deep))
  end)

  it("stops at 256 levels, so a table that contains itself raises", function()
    local t = {}
    t.self = t
    assert.truthy(errors_of(json.encode, t):find("nested deeper than 256 levels (does a table contain itself?)", 1, true))
    local deep = {}
    local cur = deep
    for _ = 1, 255 do cur[1] = {} cur = cur[1] end
    assert.equal(string.rep("[", 255) .. "{}" .. string.rep("]", 255), json.encode(deep))
    cur[1] = {}
    assert.has_error(function() json.encode(deep) end)
  end)

  it("encodes strings in object keys like values, and large values whole", function()
    assert.equal('{"caf\\ufffd":"\\n"}', json.encode({ ["caf\233"] = "\n" }))
    local big = string.rep("\255", 300000)
    local s = json.encode({ big, big })
    assert.equal(2 * (300000 * 6 + 2) + 3, #s)
    assert.equal("[]", json.encode(json.array())) -- the buffer is still usable after a large value
  end)

  it("keeps working after an error half-way", function()
    assert.has_error(function() json.encode({ string.rep("x", 5000), function() end }) end)
    assert.equal('["ok"]', json.encode({ "ok" }))
  end)
end)

describe("wxd.json.decode", function()
  it("reads arrays as marked arrays, so [] stays []", function()
    local v = json.decode("[]")
    assert.is_true(json.is_array(v))
    assert.equal("[]", json.encode(v))
    assert.equal('{"a":[]}', json.encode(json.decode('{"a":[]}')))
    assert.equal('[[],{},[[]]]', json.encode(json.decode(" [ [ ] , { } , [ [ ] ] ] ")))
    local o = json.decode('{"a":1}')
    assert.is_false(json.is_array(o))
    assert.is_nil(getmetatable(o))
  end)

  it("reads every kind of value", function()
    local v = json.decode('{"s":"x","n":-1.5e2,"i":42,"t":true,"f":false,"z":null,"a":[1,null,3],"o":{"k":"v"}}')
    assert.equal("x", v.s)
    assert.equal(-150, v.n)
    assert.equal(42, v.i)
    assert.is_true(v.t)
    assert.is_false(v.f)
    assert.equal(json.null, v.z)
    assert.equal(json.null, v.a[2])
    assert.equal(3, #v.a)
    assert.equal("v", v.o.k)
    assert.equal(1, json.decode("1"))
    assert.equal("s", json.decode(' "s" '))
    assert.equal(json.null, json.decode("null"))
    assert.is_false(json.decode("false"))
    assert.equal(1, json.decode("\239\187\191[1]")[1]) -- a UTF-8 byte order mark is skipped
  end)

  it("reads escapes, surrogate pairs, and lone surrogates as U+FFFD", function()
    assert.equal('"\\/\b\f\n\r\t', json.decode([["\"\\\/\b\f\n\r\t"]]))
    assert.equal("\0é中😀", json.decode([["\u0000\u00e9\u4E2D\ud83d\ude00"]]))
    assert.equal("\239\191\189x", json.decode([["\ud800x"]]))
    assert.equal("\239\191\189\239\191\189", json.decode([["\udc00\ud800"]]))
    assert.equal("\239\191\189\\u0041", json.decode([["\ud800\\u0041"]]))
    assert.equal("\239\191\189A", json.decode([["\ud800\u0041"]]))
  end)

  it("reads numbers exactly where a double can", function()
    assert.equal(9007199254740993, json.decode("9007199254740993")) -- rounds like a double would
    assert.equal(123456789012345, json.decode("123456789012345"))
    assert.equal(1e-300, json.decode("1e-300"))
    assert.equal(0.1, json.decode("0.1"))
    assert.equal(0, json.decode("1e-400")) -- underflow is 0
    assert.equal(-1 / math.huge, json.decode("-0"))
    assert.equal(12345678901234567890, json.decode("12345678901234567890"))
  end)

  it("refuses what RFC 8259 refuses, with nil, 'invalid json' and where", function()
    local bad = {
      [""] = "expected a value at byte 1 (found the end)",
      ["  "] = "expected a value at byte 3 (found the end)",
      ["[1,]"] = "expected a value at byte 4 (found ']')",
      ['{"a":1,}'] = "expected a string key at byte 8 (found '}')",
      ['{"a" 1}'] = "expected ':' at byte 6 (found '1')",
      ["{'a':1}"] = "expected a string key at byte 2 (found ''')",
      ["[1 2]"] = "expected ',' or ']' at byte 4 (found '2')",
      ["01"] = "more after the value at byte 2 (found '1')",
      ["+1"] = "expected a value at byte 1 (found '+')",
      [".5"] = "expected a value at byte 1 (found '.')",
      ["1."] = "invalid number at byte 3 (found the end)",
      ["1e"] = "invalid number at byte 3 (found the end)",
      ["-"] = "invalid number at byte 2 (found the end)",
      ["NaN"] = "expected a value at byte 1 (found 'N')",
      ["Infinity"] = "expected a value at byte 1 (found 'I')",
      ["1e400"] = "number out of range at byte 1",
      ["-1e400"] = "number out of range at byte 1",
      ["tru"] = "invalid literal at byte 1 (found 't')",
      ['"abc'] = "unterminated string at byte 5 (found the end)",
      ['"a\tb"'] = "control character in a string at byte 3 (found byte 0x09)",
      ['"\\x"'] = "invalid escape at byte 3 (found 'x')",
      ['"\\u12"'] = "invalid \\u escape at byte 3 (found 'u')",
      ["[1] x"] = "more after the value at byte 5 (found 'x')",
      ["\255"] = "expected a value at byte 1 (found byte 0xff)",
      ["[1]\0"] = "more after the value at byte 4 (found byte 0x00)",
    }
    for text, detail in pairs(bad) do
      local v, err, d = json.decode(text)
      assert.is_nil(v, text)
      assert.equal("invalid json", err, text)
      assert.equal(detail, d, text)
    end
  end)

  it("refuses nesting deeper than 256 levels", function()
    assert.is_true(json.is_array(json.decode(string.rep("[", 256) .. string.rep("]", 256))))
    local v, err, detail = json.decode(string.rep("[", 257) .. string.rep("]", 257))
    assert.is_nil(v)
    assert.equal("invalid json", err)
    assert.equal("nested deeper than 256 levels at byte 257", detail)
    v, err = json.decode(string.rep('{"a":', 100000))
    assert.is_nil(v)
    assert.equal("invalid json", err)
  end)

  it("keeps raw bytes in strings as sent (the encoder repairs them on the way out)", function()
    assert.equal("caf\233", json.decode('"caf\233"'))
    assert.equal('"caf\\ufffd"', json.encode(json.decode('"caf\233"')))
  end)

  it("raises for a non-string argument", function()
    assert.has_error(function() json.decode(nil) end)
    assert.has_error(function() json.decode({}) end)
  end)

  it("round-trips what python3 writes", function()
    local out, code = python([==[
import json, sys
print(json.dumps({"a": [], "b": {}, "c": [1.5, -0.25, 10**15, "\u00e9\U0001F600\n\"\\"], "d": None, "e": [[]]},
                 ensure_ascii=True))
]==], {})
    assert.equal(0, code, out)
    local v = assert(json.decode(out))
    assert.equal("[]", json.encode(v.a))
    assert.equal("{}", json.encode(v.b))
    assert.equal("é😀\n\"\\", v.c[4])
    assert.equal(1e15, v.c[3])
    assert.equal(json.null, v.d)
    assert.equal("[[]]", json.encode(v.e))
  end)
end)

describe("wxd.json.array", function()
  it("marks a table and returns it", function()
    local t = { 1 }
    assert.equal(t, json.array(t))
    assert.is_true(json.is_array(t))
    assert.equal(t, json.array(t)) -- marking twice is fine
    assert.is_false(json.is_array({}))
    assert.is_false(json.is_array("x"))
    assert.is_true(json.is_array(json.array()))
  end)

  it("raises on a non-table or a table with a metatable of its own", function()
    assert.has_error(function() json.array("x") end, "wxd.json.array: expected a table, got a string")
    assert.has_error(function() json.array(setmetatable({}, {})) end,
                     "wxd.json.array: the table already has a metatable")
  end)

  it("is reachable as wxd.json", function()
    assert.equal(json, require("wxd").json)
  end)
end)
