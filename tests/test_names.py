"""Person names (DICOM PN, PS3.5 6.2) as people write them, and the words a search matches."""

from __future__ import annotations

import pytest

from portal.index.names import name_search_text, person_name, search_words
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
    # Component groups: the alphabetic one, else the ideographic one, family name first.
    ("Yamada^Tarou=山田^太郎=やまだ^たろう", "Tarou Yamada"),
    ("Wang^XiaoDong=王^小東=", "XiaoDong Wang"),
    ("=山田^太郎=やまだ^たろう", "山田 太郎"),
    ("==やまだ^たろう", "やまだ たろう"),
    ("Hong^Gildong=洪^吉洞=홍^길동", "Gildong Hong"),
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
    assert name_search_text("Yamada^Tarou=山田^太郎") == " yamada tarou 山田 太郎"
    assert name_search_text("") == "" and name_search_text(None) == ""
    long = name_search_text("^".join(["Wolfeschlegelsteinhausenbergerdorff"] * 5) * 4)
    assert len(long) <= 512 and long.endswith("dorff")
