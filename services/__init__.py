from services.third_party_notices import drop_harmless_notices

drop_harmless_notices()
