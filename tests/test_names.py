"""Person names (DICOM PN, PS3.5 6.2) as people write them, and the words a search matches."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portal.index.names import name_match_text, name_search_text, person_name, search_words
from portal.index.referrers import key_label


@pytest.mark.parametrize(("raw", "shown"), [
    ("Doe^John", "John Doe"),
    ("House^Gregory^^Dr", "Dr Gregory House"),
    ("Doe^John^A^Mr^Jr", "Mr John A Doe, Jr"),
    # PS3.5 6.2.1.1's own examples.
    ("Adams^John Robert Quincy^^Rev.^B.A. M.Div.", "Rev. John Robert Quincy Adams, B.A. M.Div."),
    ("Morrison-Jones^Susan^^^Ph.D., Chief Executive Officer",
     "Susan Morrison-Jones, Ph.D., Chief Executive Officer"),
    ("DOE^JOHN", "JOHN DOE"),  # the case the modality wrote is kept
    ("Doe^^^", "Doe"),  # empty trailing components
    ("^Cher", "Cher"),  # no family name
    ("^^^^Jr", "Jr"),
    ("  Doe ^  John   Paul ", "John Paul Doe"),  # stray spaces
    ("John Doe", "John Doe"),  # free text without carets stays as it is
    ("Müller^Jürgen", "Jürgen Müller"),
    # Japanese, Korean, Chinese: family name first in their own script (the ideographic
    # group; Hangul for Korean), a space between the parts in Japanese only, the Latin
    # alphabetic group in brackets, family name first too.
    ("Yamada^Tarou=山田^太郎=やまだ^たろう", "山田 太郎 (Yamada Tarou)"),
    ("ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう", "山田 太郎"),  # no Latin form to add
    ("Wang^XiaoDong=王^小東=", "王小東 (Wang XiaoDong)"),
    ("=山田^太郎=やまだ^たろう", "山田 太郎"),
    ("==やまだ^たろう", "やまだ たろう"),
    ("やまだ^たろう", "やまだ たろう"),  # kana in the first group: still family first
    ("Hong^Gildong=洪^吉洞=홍^길동", "홍길동 (Hong Gildong)"),
    ("김희중", "김희중"),
    ("قباني^لنزار", "لنزار قباني"),  # right to left: given name first, as written
    ("Doe^John\\Roe^Jane", "John Doe; Jane Roe"),  # two values
    ("^^^^", ""), ("", ""), ("  ", ""), ("===", ""),
])
def test_person_names_are_written_as_people_write_them(raw: str, shown: str) -> None:
    assert person_name(raw) == shown
    assert "^" not in person_name(raw) and "=" not in person_name(raw)


def test_person_name_takes_none_and_pydicom_values() -> None:
    from pydicom.valuerep import PersonName

    assert person_name(None) == ""
    assert person_name(PersonName("House^Gregory^^Dr")) == "Dr Gregory House"


def test_referrer_name_keys_read_as_names() -> None:
    assert key_label("name:HOUSE^GREGORY") == "GREGORY HOUSE"
    assert key_label("npi:1234567893") == "npi:1234567893"
    assert key_label("id:LOCAL:42") == "id:LOCAL:42"


def test_search_words_fold_case_accents_and_delimiters() -> None:
    assert search_words("John  DOE") == ["john", "doe"]
    assert search_words("Doe, John") == ["doe", "john"]
    assert search_words("Müller") == ["muller"]
    assert search_words("O'Brien^Seán") == ["obrien", "sean"]
    assert search_words("Smith-Jones") == ["smith", "jones"]
    assert search_words("\uff24\uff4f\uff45") == ["doe"]  # full-width letters (NFKD)
    assert search_words("^^ ,") == []


def test_the_search_text_has_every_word_of_every_group() -> None:
    assert name_search_text("Doe^John") == " doe john"
    assert name_search_text("Müller^Jürgen") == " muller jurgen mueller juergen"
    # A Japanese, Korean or Chinese name is also one word, as people type it.
    assert name_search_text("Yamada^Tarou=山田^太郎") == " yamada tarou 山田 太郎 山田太郎"
    # Katakana (full or half width) folds to hiragana; the voicing mark stays.
    assert name_search_text("ﾔﾏﾀﾞ^ﾀﾛｳ") == " やまだ たろう やまだたろう"
    assert name_search_text("홍^길동") == " 홍 길동 홍길동"  # Hangul stays syllables
    assert name_search_text("") == "" and name_search_text(None) == ""
    long = name_search_text("^".join(["Wolfeschlegelsteinhausenbergerdorff"] * 5) * 4)
    assert len(long) <= 512 and long.endswith("dorff")


def test_the_match_text_keeps_each_group_folded() -> None:
    assert name_match_text("Yamada^Tarou=山田^太郎=やまだ^たろう") == \
        "=yamada^tarou=山田^太郎=やまだ^たろう="
    assert name_match_text("Buc^Jérôme^^^") == "=buc^jerome="  # no trailing empty parts
    assert name_match_text("ΔΙΟΝΥΣΙΟΣ==") == "=διονυσιοσ="  # Greek case folding
    assert name_match_text("ﾔﾏﾀﾞ^ﾀﾛｳ") == "=やまだ^たろう="
    assert name_match_text("") == "" and name_match_text("^^=") == ""


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("=^\\ aZé山やカ한\u3099ｶ*?%_'-.,")), max_size=40))
def test_any_stored_name_can_be_written_and_searched(value: str) -> None:
    """Whatever a sender puts in a PN (extra "=" groups, empty ones, scripts mixed), the pages
    can write it and the index can fold it: one file must never break the pages that show its
    name (a fourth group in Kanji once raised IndexError on every list showing the study)."""
    assert isinstance(person_name(value), str)
    assert isinstance(name_match_text(value), str)
    assert isinstance(name_search_text(value), str)


def test_a_fourth_group_is_not_part_of_the_name() -> None:
    assert person_name("Evil=a=b=山田") == "Evil"
    assert person_name("Yamada^Tarou=山田^太郎=やまだ^たろう=extra") == "山田 太郎 (Yamada Tarou)"
