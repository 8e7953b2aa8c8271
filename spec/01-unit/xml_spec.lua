-- wxd.xml: decoding untrusted XML (refusals, limits, shapes) and encoding.
local xml = require "wxd.xml"
local messages = require "fixtures.mp.messages"

local ARRAYS = { arrays = { item = true } }

-- Fails unless decode refuses s with err (and a detail that says where).
local function refused(s, err, opts)
  local t, e, detail = xml.decode(s, opts)
  assert.is_nil(t)
  assert.equal(err, e)
  assert.equal("string", type(detail))
  return detail
end

describe("wxd.xml.decode", function()
  it("maps the root's children to fields and returns the root's name", function()
    local t, root = xml.decode("<xml><A><![CDATA[hi]]></A><B>12</B><C/><D></D></xml>")
    assert.same({ A = "hi", B = "12", C = "", D = "" }, t)
    assert.equal("xml", root)
  end)

  it("gives each document a fresh parse though the thread reuses its parser and buffers", function()
    local function nest(n) return string.rep("<a>", n) .. "x" .. string.rep("</a>", n) end
    local big = string.rep("y", 200000)
    for _ = 1, 3 do
      refused('<!DOCTYPE x [<!ENTITY e "boom">]><xml><a>&e;</a></xml>', "doctype not allowed")
      -- No entity, handler or text of the refused document carries over.
      assert.same({ a = "ok" }, (xml.decode("<xml><a>ok</a></xml>")))
      refused("<xml><a>broken</xml>", "invalid xml")
      assert.same({ b = "" }, (xml.decode("<xml><b/></xml>")))
      -- Text past what the thread keeps, then short text again.
      assert.equal(big, xml.decode("<xml><t>" .. big .. "</t></xml>", { max_bytes = 300000 }).t)
      assert.same({ t = "s" }, (xml.decode("<xml><t>s</t></xml>")))
      -- A deeper limit than the kept stack, then a shallower one.
      assert.truthy(xml.decode(nest(200), { max_depth = 250 }))
      refused(nest(4), "too deep", { max_depth = 3 })
      assert.truthy(xml.decode(nest(3), { max_depth = 3 }))
      -- Stopped half way by a limit, then a document that needs every element.
      refused("<xml>" .. string.rep("<i>1</i>", 20) .. "</xml>", "too many elements", { max_elements = 5 })
      assert.equal("1", xml.decode("<xml>" .. string.rep("<i>1</i>", 4) .. "</xml>", { arrays = { i = true } }).i[4])
    end
  end)

  it("concatenates plain text and CDATA and trims nothing", function()
    local t = xml.decode("<xml><a>  x <![CDATA[ y ]]> z\n</a><b><![CDATA[]]></b><c><![CDATA[\n\t]]></c></xml>")
    assert.equal("  x  y  z\n", t.a)
    assert.equal("", t.b)
    assert.equal("\n\t", t.c)
  end)

  it("keeps markup inside CDATA as text", function()
    local t = xml.decode("<xml><a><![CDATA[<b>&amp;</b>]]></a></xml>")
    assert.equal("<b>&amp;</b>", t.a)
  end)

  it("decodes the predefined entities and character references only", function()
    local t = xml.decode("<xml><a>&lt;&gt;&amp;&apos;&quot;&#65;&#x42;&#x4E2D;</a></xml>")
    assert.equal("<>&'\"AB中", t.a)
    refused("<xml><a>&nbsp;</a></xml>", "invalid xml")
    refused("<xml><a>&#0;</a></xml>", "invalid xml")
  end)

  it("nests elements with children as tables and ignores whitespace between them", function()
    local t = xml.decode("<xml>\n  <ScanCodeInfo>\n    <ScanType><![CDATA[qrcode]]></ScanType>\n"
      .. "    <ScanResult><![CDATA[1]]></ScanResult>\n  </ScanCodeInfo>\n</xml>\n")
    assert.same({ ScanCodeInfo = { ScanType = "qrcode", ScanResult = "1" } }, t)
  end)

  it("turns repeated names into arrays, in document order", function()
    local t = xml.decode("<xml><a>1</a><b>x</b><a>2</a><a>3</a></xml>")
    assert.same({ a = { "1", "2", "3" }, b = "x" }, t)
    t = xml.decode("<xml><l><i><v>1</v></i><i><v>2</v></i></l></xml>")
    assert.same({ l = { i = { { v = "1" }, { v = "2" } } } }, t)
  end)

  it("makes opts.arrays names arrays even when they appear once", function()
    local t = xml.decode("<xml><Articles><item><Title>t</Title></item></Articles><item>x</item></xml>", ARRAYS)
    assert.same({ Articles = { item = { { Title = "t" } } }, item = { "x" } }, t)
    t = xml.decode("<xml><Articles><item><Title>t</Title></item><item><Title>u</Title></item></Articles></xml>", ARRAYS)
    assert.same({ { Title = "t" }, { Title = "u" } }, t.Articles.item)
  end)

  it("ignores attributes, comments, processing instructions and the declaration", function()
    local t, root = xml.decode('<?xml version="1.0" encoding="UTF-8"?><!-- c --><r a="1"><?pi x?><x y="2">v</x></r>')
    assert.same({ x = "v" }, t)
    assert.equal("r", root)
  end)

  it("gives an empty table for a root without children", function()
    local t, root = xml.decode("<xml>text only</xml>")
    assert.same({}, t)
    assert.equal("xml", root)
  end)

  it("reads other declared encodings into UTF-8", function()
    local t = xml.decode('<?xml version="1.0" encoding="ISO-8859-1"?><xml><a>\233</a></xml>')
    assert.equal("\195\169", t.a)
  end)

  describe("refuses", function()
    it("an external entity (XXE) without reading the file", function()
      local s = '<?xml version="1.0"?><!DOCTYPE xml [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
        .. "<xml><Content>&xxe;</Content></xml>"
      local detail = refused(s, "doctype not allowed")
      assert.falsy(detail:find("root:", 1, true))
      refused('<!DOCTYPE xml SYSTEM "file:///etc/passwd"><xml>&xxe;</xml>', "doctype not allowed")
      refused('<!DOCTYPE xml [<!ENTITY % p SYSTEM "http://127.0.0.1:1/x.dtd"> %p;]><xml/>', "doctype not allowed")
    end)

    it("entity expansion (billion laughs, quadratic blowup)", function()
      local lol = { '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">' }
      for i = 1, 9 do
        local prev = i == 1 and "lol" or ("lol" .. (i - 1))
        lol[#lol + 1] = '<!ENTITY lol' .. i .. ' "' .. string.rep("&" .. prev .. ";", 10) .. '">'
      end
      lol[#lol + 1] = "]><lolz>&lol9;</lolz>"
      refused(table.concat(lol), "doctype not allowed")
      local big = string.rep("x", 50000)
      refused('<!DOCTYPE x [<!ENTITY a "' .. big .. '">]><x>' .. string.rep("&a;", 1000) .. "</x>", "doctype not allowed")
    end)

    it("a DOCTYPE of any kind", function()
      for _, s in ipairs({
        "<!DOCTYPE xml><xml/>",
        '<!DOCTYPE xml PUBLIC "-//W3C//DTD XHTML 1.0//EN" "http://www.w3.org/TR/xhtml1/DTD/xhtml1-strict.dtd"><xml/>',
        "<!DOCTYPE xml [<!ELEMENT xml ANY>]><xml/>",
        "<!DOCTYPE xml [<!ATTLIST xml a CDATA 'x'>]><xml/>",
        '<?xml version="1.0" standalone="yes"?>\n<!DOCTYPE xml [ ]>\n<xml/>',
      }) do
        refused(s, "doctype not allowed")
      end
    end)

    it("an undefined entity", function()
      refused("<xml><a>&xxe;</a></xml>", "invalid xml")
    end)

    it("more than max_bytes, before parsing", function()
      local big = "<xml><a>" .. string.rep("a", xml.MAX_BYTES) .. "</a></xml>"
      refused(big, "too large")
      refused("<xml><a>12345</a></xml>", "too large", { max_bytes = 10 })
      assert.truthy(xml.decode("<xml><a>1</a></xml>", { max_bytes = 19 }))
    end)

    it("nesting deeper than max_depth (default 32)", function()
      local function nest(n) return string.rep("<a>", n) .. "x" .. string.rep("</a>", n) end
      assert.truthy(xml.decode(nest(32)))
      refused(nest(33), "too deep")
      refused(nest(100000), "too deep")
      refused(nest(4), "too deep", { max_depth = 3 })
    end)

    it("more elements than max_elements (default 10000)", function()
      assert.truthy(xml.decode("<xml>" .. string.rep("<a/>", 9999) .. "</xml>"))
      refused("<xml>" .. string.rep("<a/>", 10000) .. "</xml>", "too many elements")
      refused("<xml><a/><a/></xml>", "too many elements", { max_elements = 2 })
    end)

    it("malformed XML of many shapes, with a position and without echoing the input", function()
      local cases = {
        "", " ", "SECRET", "<", "<xml", "<xml>", "<xml></xmL>", "<xml><a></xml>", "<xml></a></xml>",
        "<xml/><xml/>", "<xml/>SECRET", "SECRET<xml/>", "<xml><a>1</b></xml>", "<1xml/>", "<xml a=1/>",
        '<xml a="1" a="2"/>', "<xml>&</xml>", "<xml>&amp</xml>", "<xml>&#xZZ;</xml>", "<xml>&#1114112;</xml>",
        "<xml><![CDATA[x</xml>", "<xml><!-- x </xml>", "<xml>\0</xml>", "<xml>\1</xml>", "<xml>\255\254</xml>",
        "<xml><a>\192\128</a></xml>", "<?xml version='1.0'?>", "<xml></xml>\0",
        "<x:a xmlns:x='u'><x:b></x:a>", "<xml><a><b></a></b></xml>", string.rep("<", 1000),
        '<?xml version="1.0" encoding="NOPE"?><xml/>', "<xml>]]></xml>", "<xml><a b=\"<\"/></xml>",
      }
      for _, s in ipairs(cases) do
        local t, err, detail = xml.decode(s)
        assert.is_nil(t, "accepted: " .. s)
        assert.equal("invalid xml", err, "for " .. s)
        assert.truthy(detail:match("^line %d+, column %d+: "), detail)
        assert.falsy(detail:find("SECRET", 1, true))
      end
    end)

    it("random bytes and truncations of a real message without crashing", function()
      math.randomseed(6)
      local msg = messages.get("pic_photo_or_album").xml
      for i = 0, #msg - 1 do
        local t = xml.decode(msg:sub(1, i))
        assert.is_nil(t)
      end
      for _ = 1, 2000 do
        local s = msg
        for _ = 1, math.random(1, 4) do
          local p = math.random(1, #s)
          s = s:sub(1, p - 1) .. string.char(math.random(0, 255)) .. s:sub(p + 1)
        end
        local t, err = xml.decode(s, ARRAYS)
        assert.truthy(t or err)
      end
    end)
  end)

  it("raises for arguments of the wrong type", function()
    assert.has_error(function() xml.decode(nil) end)
    assert.has_error(function() xml.decode(12) end)
    assert.has_error(function() xml.decode("<a/>", "x") end)
    assert.has_error(function() xml.decode("<a/>", { arrays = "item" }) end)
    assert.has_error(function() xml.decode("<a/>", { max_depth = 0 }) end)
    assert.has_error(function() xml.decode("<a/>", { max_bytes = -1 }) end)
  end)
end)

-- The reference: the Lua encoder wxd had before core/xml.c took over,
-- kept here to check the native one against, table for table.
local reference_encode
do
  local floor, huge = math.floor, math.huge
  local find, format, gsub = string.find, string.format, string.gsub
  local concat, sort = table.concat, table.sort
  local function check_name(name)
    if type(name) ~= "string" or not find(name, "^[%a_][%w_%.%-]*$") then
      error("wxd.xml.encode: invalid element name " .. tostring(name), 4)
    end
  end

  -- CDATA cannot contain "]]>": split it between two sections. Characters
  -- XML 1.0 forbids (control characters but tab, CR, LF) are an error in the
  -- caller's data; they are refused rather than sent to break the receiver.
  local function cdata(s)
    if find(s, "[%z\1-\8\11\12\14-\31]") then
      error("wxd.xml.encode: a string contains a control character XML cannot carry", 5)
    end
    return "<![CDATA[" .. gsub(s, "%]%]>", "]]]]><![CDATA[>") .. "]]>"
  end

  local function number_text(n)
    if n ~= n or n == huge or n == -huge then
      error("wxd.xml.encode: cannot encode " .. tostring(n), 5)
    end
    if n == floor(n) and n > -2^53 and n < 2^53 then return format("%d", n) end
    return format("%.17g", n)
  end

  local function is_array(t)
    return t[1] ~= nil
  end

  local encode_fields

  -- Appends <name>value</name> (or one element per item of an array).
  local function encode_value(out, name, v, depth)
    local tv = type(v)
    if tv == "table" and is_array(v) then
      for i = 1, #v do
        if type(v[i]) == "table" and is_array(v[i]) then
          error("wxd.xml.encode: " .. name .. ": nested arrays have no XML form", 4)
        end
        encode_value(out, name, v[i], depth)
      end
      return
    end
    out[#out + 1] = "<" .. name .. ">"
    if tv == "string" then
      out[#out + 1] = cdata(v)
    elseif tv == "number" then
      out[#out + 1] = number_text(v)
    elseif tv == "boolean" then
      out[#out + 1] = v and "true" or "false"
    elseif tv == "table" then
      if depth > 64 then error("wxd.xml.encode: nested too deep (a cycle?)", 4) end
      encode_fields(out, v, depth + 1)
    else
      error("wxd.xml.encode: " .. name .. ": cannot encode a " .. tv, 4)
    end
    out[#out + 1] = "</" .. name .. ">"
  end

  -- Fields in _order first (in that order), then the others sorted.
  encode_fields = function(out, t, depth)
    local order, seen = t._order, {}
    if order ~= nil then
      if type(order) ~= "table" then error("wxd.xml.encode: _order must be an array of names", 3) end
      for i = 1, #order do
        local name = order[i]
        if not seen[name] then
          seen[name] = true
          local v = t[name]
          if v ~= nil then
            check_name(name)
            encode_value(out, name, v, depth)
          end
        end
      end
    end
    local rest = {}
    for k in pairs(t) do
      if k ~= "_order" and not seen[k] then
        if type(k) ~= "string" then
          error("wxd.xml.encode: keys must be element names, got a " .. type(k)
                .. (type(k) == "number" and " (an array is only allowed as a field's value)" or ""), 3)
        end
        rest[#rest + 1] = k
      end
    end
    sort(rest)
    for i = 1, #rest do
      local name = rest[i]
      check_name(name)
      encode_value(out, name, t[name], depth)
    end
  end
  reference_encode = function(tbl, root)
    root = root or "xml"
    local out = { "<" .. root .. ">" }
    encode_fields(out, tbl, 1)
    out[#out + 1] = "</" .. root .. ">"
    return concat(out)
  end
end

-- A random table of the shapes messages and replies have.
local function random_table(depth)
  local t, n = {}, math.random(0, depth > 2 and 3 or 24)
  local names = { "a", "B", "_c", "d.e", "f-g", "ToUserName", "Content", "x1", "item", "Zz", "aa", "a_" }
  for i = 1, n do
    local name = names[math.random(#names)] .. (math.random(3) == 1 and tostring(i) or "")
    local r = math.random(10)
    if r <= 4 then
      local s = {}
      for j = 1, math.random(0, 12) do
        local pick = { "x", "]]>", "]", ">", "&", "<", "\t", "\n", "\r", "中", "\255", " ", "]]" }
        s[j] = pick[math.random(#pick)]
      end
      t[name] = table.concat(s)
    elseif r <= 6 then
      local nums = { 0, -7, 1348831860, 2 ^ 53 - 1, 2 ^ 53, -2 ^ 53, 0.1, 1 / 3, -1.5e300, 1e-300, 2 ^ 63 }
      t[name] = nums[math.random(#nums)]
    elseif r == 7 then
      t[name] = math.random(2) == 1
    elseif r == 8 and depth < 4 then
      t[name] = random_table(depth + 1)
    elseif r == 9 and depth < 4 then
      local arr = {}
      for j = 1, math.random(1, 3) do arr[j] = math.random(2) == 1 and random_table(depth + 1) or ("v" .. j) end
      t[name] = arr
    end
  end
  if math.random(3) == 1 then
    local order = {}
    for k in pairs(t) do if math.random(2) == 1 then order[#order + 1] = k end end
    order[#order + 1] = "Missing"
    if order[1] then order[#order + 1] = order[1] end -- a repeated name counts once
    t._order = order
  end
  return t
end

describe("wxd.xml.encode", function()
  it("writes strings as CDATA, numbers as text, in _order then sorted", function()
    local s = xml.encode({ Z = "z", CreateTime = 1348831860, Content = "hi", A = 1.5, B = true,
                           _order = { "Content", "CreateTime", "Missing" } })
    assert.equal("<xml><Content><![CDATA[hi]]></Content><CreateTime>1348831860</CreateTime>"
      .. "<A>1.5</A><B>true</B><Z><![CDATA[z]]></Z></xml>", s)
  end)

  it("splits ]]> between two CDATA sections", function()
    local s = xml.encode({ a = "x]]>y]]>" })
    assert.equal("<xml><a><![CDATA[x]]]]><![CDATA[>y]]]]><![CDATA[>]]></a></xml>", s)
    assert.equal("x]]>y]]>", xml.decode(s).a)
  end)

  it("writes nested tables as elements and arrays as repeated elements", function()
    local s = xml.encode({ ArticleCount = 2, Articles = { item = { { Title = "a", _order = { "Title" } }, { Title = "b" } } },
                           _order = { "ArticleCount", "Articles" } })
    assert.equal("<xml><ArticleCount>2</ArticleCount><Articles><item><Title><![CDATA[a]]></Title></item>"
      .. "<item><Title><![CDATA[b]]></Title></item></Articles></xml>", s)
  end)

  it("takes another root name", function()
    assert.equal("<root><a>1</a></root>", xml.encode({ a = 1 }, "root"))
  end)

  it("writes integers exactly and other numbers round-trippably", function()
    local t = xml.decode(xml.encode({ a = 2 ^ 53 - 1, b = -7, c = 0.1 }))
    assert.equal("9007199254740991", t.a)
    assert.equal("-7", t.b)
    assert.equal(0.1, tonumber(t.c))
  end)

  it("raises for what has no XML form", function()
    assert.has_error(function() xml.encode("x") end)
    assert.has_error(function() xml.encode({ ["bad name"] = "x" }) end)
    assert.has_error(function() xml.encode({ ["1a"] = "x" }) end)
    assert.has_error(function() xml.encode({ a = function() end }) end)
    assert.has_error(function() xml.encode({ a = 0 / 0 }) end)
    assert.has_error(function() xml.encode({ a = math.huge }) end)
    assert.has_error(function() xml.encode({ a = "bell\7" }) end)
    assert.has_error(function() xml.encode({ "array at the root" }) end)
    assert.has_error(function() xml.encode({ a = { { "nested" } } }) end)
    assert.has_error(function() xml.encode({ a = 1 }, "bad root") end)
    local cyc = {}
    cyc.self = cyc
    assert.has_error(function() xml.encode(cyc) end)
  end)

  it("names the problem and the caller's line in its errors", function()
    local function msg(f)
      local ok, err = pcall(f)
      assert.is_false(ok)
      return err
    end
    assert.matches("xml_spec.lua:%d+: wxd.xml.encode: invalid element name bad name$",
      msg(function() xml.encode({ ["bad name"] = "x" }) end))
    assert.matches("wxd.xml.encode: a string contains a control character XML cannot carry",
      msg(function() xml.encode({ a = "bell\7" }) end), 1, true)
    assert.matches("wxd.xml.encode: a: nested arrays have no XML form",
      msg(function() xml.encode({ a = { { "nested" } } }) end), 1, true)
    assert.matches("wxd.xml.encode: a: cannot encode a function",
      msg(function() xml.encode({ a = print }) end), 1, true)
    assert.matches("wxd.xml.encode: cannot encode nan", msg(function() xml.encode({ a = 0 / 0 }) end), 1, true)
    assert.matches("wxd.xml.encode: cannot encode -inf", msg(function() xml.encode({ a = -math.huge }) end), 1, true)
    assert.matches("wxd.xml.encode: _order must be an array of names",
      msg(function() xml.encode({ a = 1, _order = "a" }) end), 1, true)
    assert.matches("keys must be element names, got a number",
      msg(function() xml.encode({ a = 1, [2] = "x" }) end), 1, true)
    assert.matches("the root table must have named fields",
      msg(function() xml.encode({ "array at the root" }) end), 1, true)
    assert.matches("self: nested too deep (a cycle?)", msg(function()
      local cyc = {}
      cyc.self = cyc
      xml.encode(cyc)
    end), 1, true)
  end)

  it("nests 64 levels below the root, not more", function()
    local function nest(n)
      local t = { leaf = "x" }
      for _ = 1, n do t = { n = t } end
      return t
    end
    assert.equal(reference_encode(nest(63)), xml.encode(nest(63)))
    assert.has_error(function() xml.encode(nest(70)) end)
  end)

  it("sorts many fields as byte strings, as the reference does", function()
    local t = {}
    for i = 1, 300 do t[string.format("k%d", (i * 7919) % 1000)] = i end
    t.K, t.k, t.kk, t["k-"], t._z = 1, 2, 3, 4, 5
    assert.equal(reference_encode(t), xml.encode(t))
  end)

  it("writes exactly what the reference Lua encoder writes, for 3000 random tables", function()
    math.randomseed(20261203)
    for i = 1, 3000 do
      local t = random_table(1)
      local want = reference_encode(t)
      local got = xml.encode(t)
      if got ~= want then
        error(string.format("table %d:\nwant %s\ngot  %s", i, want, got))
      end
    end
  end)
end)

describe("WeChat messages", function()
  for _, m in ipairs(messages) do
    it("decodes and round-trips " .. m.name, function()
      local t, root = xml.decode(m.xml, ARRAYS)
      assert.equal("xml", root)
      assert.equal(messages.ACCOUNT, t.ToUserName)
      assert.equal(messages.USER, t.FromUserName)
      assert.truthy(tonumber(t.CreateTime))
      for k, v in pairs(m.fields) do
        if type(v) == "table" then
          -- Compare the given part of nested fields.
          for k2, v2 in pairs(v) do assert.same(v2, t[k][k2]) end
        else
          assert.equal(v, t[k], m.name .. "." .. k)
        end
      end
      local again = xml.decode(xml.encode(t), ARRAYS)
      assert.same(t, again)
    end)
  end
end)
