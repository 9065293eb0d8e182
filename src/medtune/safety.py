"""Medical safety layer: red-flag (emergency) detection on the question and recent history, the fixed
emergency notice, and the disclaimer every answer carries. Used by the CLI and the server alike.

Detection works on concepts, not phrases. `SIGNS` lists, for each warning sign, the ways patients and
relatives say it (嘴角漏水, 口水往外淌, 嘴巴合不拢 for a drooping face; 推不醒, 喊她只会哼哼 for
unresponsiveness). A rule fires when all of its signs/patterns match the patient's text (a sign alone, or
sign + context such as an allergen, a pregnancy or an infant's age), adding its weight to a category; a
category is flagged at 1.0, so signs that are harmless alone (palpitations, a swollen face) need
company. Two cross-cutting concepts supply that company: ACUITY (突然, 刚才, 吵着吵着, 十分钟后, 越来越, 开会
开到一半) near a worrying sign, and SYSTEMIC signs of a failing body (pallor, cold sweat, cold limbs,
cyanosis, collapse, drowsiness, no pulse), two of which lift every category that has a sign. Dampers
keep calm questions calm: a sign negated in its clause (没有/无/未/不是/否认) does not count; a story
told in the past or as a habit (昨天, 有一次, 经常) gets no acuity; a question about an already diagnosed
episode with nothing happening now counts half; signs in a sentence that supposes them (如果, 万一, 预防)
count 0.4, except suicidal words. Whatever the model says, a flagged question gets the notice first.

Measured (bench/safety_eval.py), honestly: every labelled set there has been seen during development, so
its 1.0s are not estimates. Fresh paraphrase sets, each scored once before it was used: heldout3
(recall 0.30, precision 0.75 for the session-2 detector) and six probes of 20-30 emergencies and as many
near-misses written in session 3, each after the previous round of changes. On probes A-F recall went
from the session-2 detector's 0.23, 0.35, 0.30, 0.45, 0.50, 0.45 to this design's 0.47, 0.40, 0.55,
0.60, 0.70, 0.70, precision from 1.00 (0.91 and 0.90 on E and F) to 1.00 (0.92, 0.93, 0.93 on C, E, F).
Expect about 0.6-0.7 recall on unseen wordings: each fresh set shows wordings no lexicon has met, so
this layer is a safety net, not triage. 0.73% of the 7,644 real sample questions are flagged (mostly
described seizures and vomited blood); the blind held-out figure, when bench/safety_heldout4.jsonl is
present, is the unbiased one.

    >>> assess("我爸突然嘴歪了，说话含糊不清，右手拿不住筷子").category
    'stroke'
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from medtune.chat_format import DISCLAIMER_MARK, NOTICE_MARK

# Both begin with the chat format's marks, so that they are stripped from history sent back to us.
EMERGENCY_NOTICE = (
    NOTICE_MARK + "您描述的情况可能是急症，请立即拨打120急救电话，或马上前往最近医院的急诊科就诊，"
    "不要等待线上回复。在等待救援时，请尽量让患者保持安全体位，不要自行给药。"
)
DISCLAIMER = DISCLAIMER_MARK + "以上内容由AI生成，仅供健康参考，不构成诊断，也不能替代医生面诊；如症状持续或加重，请及时就医。"

CATEGORY_NAMES = {
    "stroke": "疑似脑卒中",
    "cardiac": "疑似心梗/主动脉夹层/严重心律失常",
    "bleeding": "严重出血",
    "breathing": "呼吸困难",
    "unconscious": "意识丧失/意识障碍",
    "seizure": "抽搐发作",
    "anaphylaxis": "严重过敏反应",
    "poisoning": "中毒/药物过量/毒物咬伤",
    "suicide": "自杀风险",
    "obstetric": "产科急症",
    "infant": "婴幼儿急症",
    "choking": "气道异物/窒息",
    "trauma": "严重外伤/烧伤/溺水/触电",
}

# When several categories are flagged, the most specific cause is named (an infant's seizure is an
# infant emergency; a seizure usually also looks like unconsciousness).
PRECEDENCE = ("infant", "choking", "anaphylaxis", "obstetric", "poisoning", "suicide", "stroke", "cardiac",
              "seizure", "trauma", "bleeding", "breathing", "unconscious")
assert set(PRECEDENCE) == set(CATEGORY_NAMES)

# ----------------------------------------------------------------------------- lexicons
#
# Signs as patients and relatives describe them, each a list of the ways people say it. Rules below
# combine them; a sign that can mean something harmless on its own (a swollen face, palpitations) only
# counts with another sign or a context (an allergen, a pregnancy, an infant's age).

def _any(*words: str) -> str:
    return "(?:" + "|".join(words) + ")"


_NUM = r"(?:\d+|[一二两三四五六七八九十几]+)"
_KIN = r"(?:宝宝|孩子|小孩|婴儿|宝|娃|儿子|女儿|闺女|孙子|孙女|外孙女?|小朋友)"
_INFANT = _any("新生儿", "婴儿", "满月", "早产儿", "奶娃", rf"{_KIN}(?:才|刚|刚满)?(?:一|两|1|2)岁(?:半|多)?(?![半多]|时|的时候|那年)", "不满一岁", "不到一岁",
               rf"{_NUM}\s*个?多?(?:(?:天|周)(?:大的|大|的)|个月(?:大)?的?){_KIN}", rf"(?<!生完)(?<!生了)(?<!生下){_KIN}(?:才|刚|刚满|出生)?{_NUM}\s*个?多?(?:天|周|个月)")
_YOUNG_INFANT = _any("新生儿", "满月", "早产儿", rf"{_NUM}\s*(?:天|周)(?:大的|大|的){_KIN}", rf"(?<!生完)(?<!生了)(?<!生下){_KIN}(?:才|刚|出生)?{_NUM}\s*(?:天|周)",
                     rf"[一二两三123]\s*个?多?月(?:大)?的?{_KIN}", rf"{_KIN}(?:才|刚)?[一二两三123]\s*个?多?月")
_FEVER = _any("发烧", "发热", "高烧", "高热", r"体温.{0,4}(?:3[89]|4[0-2])", r"(?:3[89]|4[0-2])(?:\.\d)?\s*(?:度|℃|°)",
              "三十[八九](?:度|点)", "四十多?度")
_HIGH_FEVER = _any("高烧", "高热", r"(?:39|4[0-2])(?:\.\d)?\s*(?:度|℃|°)", "三十九(?:度|点)", "四十多?度", "烧得(?:很)?(?:厉害|烫)")
_ACUTE = _any("突然", "刚才", "刚刚", "一下子", "正在", "突发", "猛地", "忽然")
# Acuity: the words that say a sign began just now or is getting worse ("吵着吵着", "没几分钟",
# "越来越"). A sign that is worrying but not decisive alone counts as a red flag with one of them.
ACUITY = _any("突然", "忽然", "猛地", "一下子", "突发", "刚才", "刚刚", "正在", "此刻", "越来越", "不停地?", "一直在",
              r"(?:半|一|两|几|\d+|[二三四五六七八九十]+)个?(?:多)?(?:分钟|小时)(?:前|以?后|之后|了)", "没几分钟", "没一会", r"[\u4e00-\u9fff]到一半", r"(?:今天|今早|今晚|早上|上午|中午|下午|晚上|半夜).{0,4}开始", r"(?:打|叫)(?:了)?(?:120|救护车)",
              r"([\u4e00-\u9fff])着\1着", "半夜.{0,4}醒")
_SIDE = _any("半边", "一侧", "一边", "单侧", "[左右](?:边|侧)?")
_LIMB = _any("身子", "身体", "肢体", "手脚", "胳膊", "手臂", "手", "腿", "脚", "胳臂")
_WEAK = _any("没力", "无力", "没劲", "使不上劲", "动不了", "不能动", "拿不住", "抓不住", "抓不起", "握不住", "抬不起",
             "伸不进", "举不起", "拿不稳", "不好使", "软了", "耷拉", "软绵绵", "发软", "发沉", "不听话", "不会动", "动弹不了", r"(?:一点)?劲(?:都|也)?没(?:有)?", r"没有?力气",
             "麻木", "发麻", "麻了", "不听使唤", "不灵", "瘫", "没知觉")

SIGNS = {
    "face_droop": _any("嘴歪", "嘴巴歪", r"嘴角.{0,4}(?:歪|斜|漏|流口水|往下|耷拉)", r"嘴(?:巴|角)?.{0,3}(?:合不拢|闭不上|包不住)", r"(?:饭|水|汤|食物|东西)从嘴角.{0,4}(?:往外)?(?:掉|漏|流)",
                       r"口水.{0,4}(?:往外|往下|直|一直)(?:流|淌)", r"(?:鼓不起|漏气).{0,2}腮|腮.{0,3}漏气", r"脸.{0,4}(?:不对称|垮)", "口角歪", "口眼歪",
                       rf"{_SIDE}脸.{{0,6}}(?:麻|歪|塌|耷拉|不能动|没知觉|僵|往下)", "脸歪"),
    "one_side_weak": _any(rf"{_SIDE}{_LIMB}.{{0,8}}{_WEAK}", "拿不住筷子", r"(?:筷子|勺子|碗|杯子|梳子|笔|手机|牌|东西).{0,3}(?:老|总|一直|直|接连)(?:往下)?掉",
                          rf"{_LIMB}.{{0,3}}(?:像|好像)不是(?:自己|他|她)的", r"(?:手里|手上)的.{0,6}掉", r"筷子.{0,3}掉",
                          r"拖着.{0,3}腿", r"腿.{0,3}拖(?:地|着)"),
    "speech": _any(r"说话.{0,6}(?:含糊|不清|不利索|大舌头|说不清|吐字|费劲|不连贯)", "口齿不清", "吐字不清", "咬字不清", "说不了话", r"(?:问|跟|叫|喊)(?:他|她).{0,6}(?:光瞪眼|不吭声|不出声|干瞪眼|只会哼)",
                   r"舌头.{0,6}(?:不利索|不灵|发硬|发僵|发大|变大|大了|打结|不听使唤|转不过来)", "前言不搭后语", "词不达意", "言语不清", "说不出话", r"讲话.{0,6}(?:含糊|不清|像喝醉|大舌头)",
                   "话(?:也)?说不(?:出|清|利索)", "答不上(?:来|话)", "像喝醉了?一样", r"发不出.{0,6}(?:声|音)",
                   "不会说话", "说不了话", r"只会(?:点头|摇头|啊啊)", r"说话.{0,4}颠三倒四", r"叫不出.{0,4}名字"),
    "vision_loss": _any("看东西.{0,2}重影", "视物重影", "重影", r"(?:两个|双)(?:影子|影)", "双影", r"突然.{0,3}看不(?:见|清)", r"一只眼.{0,4}(?:看不见|黑了|失明)",
                        r"(?:左|右|一)边.{0,6}看不(?:见|到|清)", r"眼前一黑.{0,8}看不(?:见|到|清)", "视野.{0,3}(?:缺|少了|黑)"),
    "imbalance": _any(r"走路.{0,6}(?:偏|不稳|摇晃|往一边|打晃|画龙|跟喝醉|踩棉花)", "站不稳", "站不住", "天旋地转", r"往(?:左|右|一)边(?:倒|歪)"),
    "thunderclap": _any(r"头.{0,4}(?:要炸|炸开|裂开|爆炸|要裂)", r"(?:这辈子|从来没有?|有生以来|人生中|从没).{0,6}(?:最|这么).{0,4}(?:痛|疼)",
                        r"突然.{0,4}(?:剧烈)?头(?:痛|疼).{0,8}(?:吐|呕)", r"剧烈(?:的)?头(?:痛|疼).{0,8}(?:吐|呕|脖子.{0,3}硬)"),
    "chest_pain": _any(r"(?:胸口|胸前|心口|胸部|前胸|心窝|胸)(?:里|那里|那儿|这里|这块)?.{0,8}(?:压|闷|疼|痛|绞|紧|憋|揪|攥|勒|堵|石头|撕|火烧|烧灼|火辣|踩|坐着|挤|捏|箍)",
                       r"(?:捂|按|抓)着.{0,2}胸"),
    "radiating": _any(r"(?:疼|痛|麻|窜|放射|牵扯|带着).{0,6}(?:左臂|左胳膊|左肩|左手|后背|下巴|下颌|牙)",
                      r"(?:到|向|往)(?:了)?.{0,3}(?:左臂|左胳膊|左肩|左手|后背|下巴|下颌)",
                      r"(?:牵扯|牵连|连着|带着|窜|扯)(?:到)?.{0,6}(?:下巴|下颌|左边?(?:的)?(?:胳膊|肩膀?|手臂|手)|后背|牙)"),
    "sweating": _any("冷汗", "大汗", "虚汗", "凉汗", r"(?:手心|额头|脑门|头上|脸上|背上)(?:上)?(?:都|全)?(?:是)?汗", r"汗.{0,2}(?:直流|直冒|往下淌|往下滴|湿透)", "一身汗", "浑身是汗", "满头大汗", "全身是汗", "浑身湿透", "出了好多汗", "汗珠",
                     r"(?:满头|一头|满脸)(?:是)?汗", "直冒汗", "汗如雨下"),
    "unrelieved": _any(r"(?:二十|三十|四十|[2-9]\d|半个?|一个?多?)多?(?:分钟|小时)", "不缓解", "没缓解",
                       r"(?:歇|休息|坐).{0,6}(?:不管用|没用|不好|没好|也不行)",
                       r"(?:吃|含|喷|用)了.{0,6}(?:药|片).{0,4}(?:也|都|还)?(?:没用|不管用|没好转|不见好|没缓解|不缓解|不行|没效果)",
                       r"(?:硝酸甘油|救心丸|丹参滴丸|含了?.{0,2}药).{0,8}(?:没用|不管用|不行|无效|不见好|没缓|缓不下来|不缓解|没见好|没效果)"),
    "shock": _any(r"脸(?:色)?.{0,2}(?:煞白|苍白|发白|惨白|很差|难看|发灰|蜡黄|都白了|白得)", r"手脚.{0,2}(?:冰凉|发凉|冰冷|冰)", "嘴唇发白", r"血压.{0,4}(?:很低|低到|掉)"),
    "palpitations": _any("心慌", "心悸", r"心跳.{0,4}(?:快|乱|不齐|慢)", "心里(?:特别|非常|很)?难受"),
    "dyspnea": _any(r"喘不(?:上|过|来)气", r"气.{0,2}(?:上不来|喘不上|接不上|透不过|不够用)", "呼吸困难", "透不过气", "上不来气",
                    "憋得慌", "憋闷", r"喘得.{0,3}(?:厉害|不行|只能|说不)", r"大口.{0,4}喘", "张口呼吸", r"呼吸.{0,4}(?:特别|很|非常)?(?:急|快|费力|费劲|困难)",
                    r"喘气.{0,6}(?:困难|费劲|急)", r"鼻翼.{0,4}扇", "三凹", r"憋得.{0,6}(?:喘|透不过|受不了|脸)",
                    r"喘得.{0,8}(?:说不|一个字|只能|直不起|躺不)", r"(?:吸气|呼吸|喘气|嗓子|喉咙).{0,8}(?:哨音|哨子|吱吱|嘶嘶|拉风箱)",
                    r"肋骨.{0,8}(?:坑|凹|陷)", r"(?:锁骨|胸口).{0,4}(?:上面|下面)?.{0,4}一吸一(?:个)?(?:坑|凹)", "呼哧呼哧", "气都喘不匀", r"喘不(?:动|匀)", r"(?:往前|趴着|撑着).{0,3}喘",
                    r"坐起来.{0,6}(?:喘|还是喘|才能喘)"),
    "cyanosis": _any(r"(?:嘴唇|口唇|脸|指甲|手指|嘴)(?:都|也|有点|发)?.{0,5}(?:发紫|青紫|发绀|乌紫|发乌|发青|紫了|乌了|紫紫|乌青)",
                     r"(?:嘴唇|口唇|脸|脸色|嘴)(?:都|也|全|已经)?(?:是|变得?|成了?)(?:青紫|紫|乌|青|灰)(?:的|了|色)",
                     r"(?:嘴唇|口唇|指甲|嘴巴)(?:都|也|有点|已经|发|变|是){1,3}(?:紫|乌|青|绀)"),
    "orthopnea": _any("躺不下", r"(?:没法|不能|没办法)躺",  r"只能坐着", r"坐着.{0,3}喘", "不能平躺"),
    "broken_speech": _any(r"说话.{0,6}(?:说不完|接不上)", r"一句话.{0,4}说不完", "说不完整", r"一个字一个字.{0,3}(?:往外|说|蹦|挤)",
                          "说不成句", r"一句话.{0,8}(?:停|歇|喘).{0,6}(?:才|能)?说完", r"话都说不(?:出|连贯|完)", r"喘.{0,8}说不(?:了|出)话"),
    "inhaler_fails": _any(r"(?:喷|吸|用)了.{0,8}(?:不管用|没用|不见效|不缓解|没缓解|都不行|也不行)", r"喷(?:了)?(?:药|雾).{0,4}(?:没用|不管用|不见效|不行)", r"(?:吸入剂|喷雾|气雾剂|喷剂|沙丁胺醇|万托林).{0,6}(?:用|喷|吸)了好几(?:次|下|回)", r"(?:喷雾|吸入剂|气雾剂).{0,8}(?:没用|不管用|没缓解|不缓解)"),
    "unresponsive": _any(r"(?:叫|喊|推|拍|摇|弄)不(?:太|大)?醒", r"(?:叫|喊)(?:他|她)?不(?:应|答应)", r"(?:突然|一下子|就|人)(?:就)?没(?:有)?反应了?",
                         r"(?:没|没有)气了", "没了呼吸", r"(?:叫|喊)(?:他|她)?.{0,4}都不理", r"(?:叫|喊|问)(?:他|她)?.{0,4}只(?:会|是|能)哼", r"(?:叫|喊|拍|推|摇)(?:他|她|也|了|了好几下)?.{0,6}(?:都|也)?(?:没有?|不)(?:反应|醒|答应)",
                         "昏迷", "不省人事", "昏过去", r"晕过去.{0,6}(?:没醒|不醒|醒不过来)", "失去意识", "意识不清", "神志不清",
                         r"没有?(?:呼吸|气了)", r"(?:摸不到|摸不着|没有?|没了)(?:脉搏|脉|心跳)", r"(?:一直|还)没(?:有)?醒", r"叫(?:他|她)?.{0,6}又睡(?:过去|着)", r"(?:叫|喊|拍|推)(?:他|她)?.{0,6}都?不(?:答应|理|回应|吭声)", "一动不动", r"(?:人|躺着|趴着)(?:一点)?没(?:了)?动静", r"呼吸(?!暂停).{0,2}(?:很弱|微弱|停|没了)", r"怎么.{0,2}(?:叫|喊|推|拍).{0,2}都.{0,4}(?:不醒|没反应)"),
    "confusion": _any("说胡话", "胡言乱语", "答非所问", "颠三倒四", r"(?:几号|哪天|在哪|是谁).{0,4}(?:答不上|说不上|不知道)", "前言不搭后语", r"眼(?:睛|神)(?:直直的|发直|呆滞|直勾勾)", "两眼发直", "认不得人", r"不认识(?:人|我|家里人|家人)", r"(?:越来越|突然|有点)?糊涂了?",
                      "意识模糊", "神志模糊", r"认不出.{0,4}(?:人|我)"),
    "drowsy": _any("昏睡", "嗜睡", "昏昏沉沉", "迷迷糊糊", "迷迷瞪瞪", "犯迷糊", "晕乎乎", "睡不醒", r"(?:老|一直|总)想睡", r"反应.{0,2}(?:迟钝|慢|变慢)"),
    "collapse": _any("晕倒", "昏倒", "倒地", r"倒在.{0,6}(?:地|楼道|厕所|路|上)", "瘫倒", "栽倒"),
    "convulsing": _any("抽搐", "抽风", "惊厥", r"(?:手脚|四肢|全身|身体|浑身)(?:一直)?(?:抽动|抽|抖动|一抽一抽|一抖一抖|僵硬|发硬|挺直|绷直)",
                       "一抽一抽", "一抖一抖", r"(?:人|他|她|还|正|一直)在抽(?!烟|血|筋|空|屉|奖)", "一挺一挺", r"一下一下(?:地|的)?(?:抖|抽)", r"(?:牙|嘴)咬得?(?:紧紧|死死)"),
    "seizure_signs": _any(r"(?:两眼|眼睛)(?:往上)?上?翻", "翻白眼", "口吐白沫", r"嘴.{0,4}(?:冒|吐)白?(?:沫|泡沫|泡)", "牙关紧闭",
                          ),
    "seizure_long": _any(r"(?:几|好几|\d+|[一二三四五六七八九十]+)分钟.{0,4}(?:还在抽|没停|还没停|还抽)",r"(?:抽|发作)了.{0,8}(?:分钟|没停|不停|停不下)", r"抽.{0,4}(?:停不下来|一直不停)"),
    "allergen": _any("过敏", r"(?:打完|打了|输|注射|用了).{0,6}(?:针|疫苗|药|液)", r"(?:吃了|吃完|服了).{0,6}(?:药|鸡蛋|牛奶)(?:以?后|之后|完)",
                     "青霉素", "阿莫西林", "磺胺", "阿司匹林", "布洛芬", r"(?:\d+|[一二三四五六七八九十几]+)分钟(?:后|以后|之后)", "头孢", "海鲜", "花生", "芒果", "虾", "蟹", "坚果", "腰果", "核桃", "杏仁", "蜂", "蜇", "蛰", "造影剂",
                     r"(?:打完|打了|输完|输了|注射完?)(?:针|液|疫苗|吊瓶)?", r"吃了.{1,6}(?:之后|以后|后)"),
    "throat_tight": _any(r"(?:喉咙|嗓子眼|嗓子|喉头|喉|气管)(?:里)?.{0,6}(?:发紧|很紧|紧|肿|堵|收缩|卡得慌|东西卡)", r"声音.{0,3}(?:嘶哑|哑了|变了)",
                         "气不够用", r"舌头.{0,4}(?:越来越)?(?:大|肿|厚)"),
    "face_swelling": _any(r"(?:嘴唇|舌头|脸|眼睛|眼皮|嘴|喉咙).{0,6}肿"),
    "hives_all_over": _any(r"(?:全身|浑身|身上到处|满身).{0,6}(?:疹|疙瘩|风团|起红|红肿|痒|一片片|一块块|一片一片)"),
    "wheeze": _any("(?<!哮)喘(?!息性)", r"呼吸.{0,3}(?:急|困难|费力|不畅)"),
    "faint": _any(r"(?:快|要)晕(?:过去|倒)", r"嘴唇.{0,2}(?:发白|苍白)", r"脸色苍白.{0,6}(?:冷汗|晕)", r"血压.{0,3}(?:低|掉)", "晕过去",
                  r"(?:整个人|全身|浑身|腿)(?:都)?发软", r"眼前.{0,2}(?:发花|发黑|黑)", r"嘴(?:巴|唇)?.{0,2}(?:麻麻|发麻)", "站不住", "冒冷汗"),
    "pregnant": _any("怀孕", r"孕\s*\d+\s*周", r"孕[早中晚]期", "孕期", "孕妇", rf"孕{_NUM}(?:周|个月)", "停经", "刚生完", "流产", "小产", "人流", "清宫", "药流", "生完孩子",
                     "产后", "分娩", "顺产", "剖腹产", "剖宫产", "宫外孕", "胎儿", "坐月子", "怀着", "怀了"),
    "visual_sparks": _any("冒金星", r"眼前.{0,3}(?:发黑|闪光|模糊|一阵阵黑)", "看东西模糊", "眼花", "视物模糊"),
    "pregnancy_danger": _any("出血", "流血", r"血.{0,6}(?:往外涌|往外冒|一直流|止不住|哗哗)", r"(?:护垫|卫生巾|垫子).{0,6}(?:就)?(?:满了|湿透)", _HIGH_FEVER, r"恶露.{0,4}(?:臭|很多|特别多|越来越多)", r"看东西.{0,4}(?:一闪|闪|花|重影)", r"头(?:特别|很|剧烈|非常|一直)(?:疼|痛)",
                             r"血压.{0,4}(?:1[5-9]\d|2\d\d)", r"(?:肚子|下腹|小腹|腹部).{0,4}撕.{0,2}(?:疼|痛)", r"差点.{0,2}(?:晕|摔|倒)", r"肩膀?.{0,2}(?:也)?疼", r"见红.{0,4}(?:多|很多|不止)", r"(?:肚子|小腹|下腹|腹部|一侧|肚).{0,6}(?:剧痛|疼得|痛得|发硬|硬邦邦|绞痛|剧烈)",
                             r"突然.{0,4}(?:肚子|腹).{0,4}(?:疼|痛)", r"头(?:痛|疼)得.{0,2}厉害", "看东西模糊", "眼花", "视物模糊", "抽搐",
                             "破水", "羊水", r"(?:下面|阴道|下身).{0,6}流.{0,4}水", r"哗.{0,3}流", r"流了?(?:好多|很多|一大?股)水", r"胎动.{0,6}(?:少|没有|消失|减少|不动|没了)",
                             r"(?:没|没有|不)(?:感觉|觉得|摸)?到?.{0,6}(?:孩子|宝宝|胎儿)(?:在)?动", r"胎心.{0,4}(?:没|慢|快|异常)", "晕倒", "昏倒", "晕过去", "止不住"),
    # An infant's danger signs: decisive ones, and soft ones (feeding and alertness; fluids, colour and
    # cry) that flag when both kinds are seen or when they came on suddenly.
    "infant_danger": _any(_HIGH_FEVER, r"(?:果酱|果冻|红果酱)(?:一?样|色|似的)", r"吐.{0,8}(?:绿色|黄绿|墨绿|胆汁)", r"(?:绿色|胆汁).{0,4}(?:的)?(?:吐|呕)",
                          r"一阵一阵(?:地|的)?(?:哭|闹)", r"睡不醒", r"眼(?:睛|神)?.{0,2}发直", r"叫(?:他|她)?不应", r"(?:浑身|全身|手脚).{0,6}(?:一下一下|一抽|抖)",
                          r"囟门.{0,6}(?:鼓|凸)", r"抽(?:搐|动|风)", "惊厥", "翻白眼", "上翻", r"呛(?:到|住|奶)", "憋", "发紫", "发青", "叫不醒",
                          "没反应", r"呼吸.{0,4}(?:急|快|费力|困难|一停一停|停顿|暂停)", r"鼻翼.{0,4}扇", "喘", "呻吟"),
    "infant_listless": _any(r"不爱(?:吃|喝)奶", r"(?:一直|总在|老是?)睡", r"(?:奶|奶嘴).{0,4}(?:不吸|不吃|吸不动)", r"喂奶.{0,4}(?:也)?不吸", "没精神", "软软的", "软绵绵",
                            r"(?:老|一直|总)想睡", "嗜睡", "蔫", r"精神.{0,4}(?:很差|差|不好)", r"(?:吃奶|喝奶).{0,6}(?:不吃|少|吃不下|喘|拒)",
                            r"(?:不肯|不吃|拒)(?:吃)?奶"),
    "infant_unwell": _any(r"黄疸.{0,6}(?:重|加重|越来越|深)", r"(?:全身|浑身|眼白).{0,3}(?:都)?(?:是)?黄", r"手脚.{0,2}(?:凉|冰)", r"哭声.{0,3}(?:尖|弱|小|微弱)",
                          r"尿.{0,6}(?:少|一次|没)", r"眼窝.{0,4}(?:陷|凹)", r"囟门.{0,6}(?:凹|陷)", r"哭.{0,3}没(?:有)?眼泪", r"一直吐", r"(?:尿少|没有?尿)", r"小便.{0,4}(?:少|没有?)", r"嘴(?:唇|巴)?.{0,2}(?:很|特别|发)?干"),
    "fluid_loss": _any(r"(?:拉|泻|吐)(?:了)?.{0,4}(?:[五六七八九十]|好多|十几|很多|\d+)(?:次|回)", "水样便", r"(?:拉|泻|吐)得.{0,3}(?:厉害|很凶|不行)"),
    "choke_object": _any("卡住", "卡在", "噎住", "噎着", r"(?:玩具|硬币|纽扣|珠子|弹珠|瓜子|花生|果冻|糖|豆|磁铁|电池|笔帽|零件)", r"呛(?:到|进|住)(?!.?水)", r"吸进(?:去|气管)", "误吸", "异物", "卡喉",
                         r"(?:整颗|整个|一颗|一粒|一块|一整).{0,6}(?:咽|吞|吸|卡)"),
    "airway_distress": _any(r"喘不", r"(?:口水|唾沫|东西)(?:都|也)?咽不下", r"(?:喘气|呼吸)(?:有|带)?.{0,2}(?:声音|呼噜|哨)", r"一直干呕", "憋", "发紫", "咳不出", "哭不出", r"说不出", "不能呼吸", "没法呼吸", "呼吸困难", r"一直.{0,2}咳",
                            "剧烈咳", "呛咳", r"脸.{0,3}(?:通红|憋红|发紫|发青)", r"喘得.{0,3}厉害"),
    "child_ingestion": _any(rf"{_KIN}.{{0,8}}(?:吃|喝|吞|舔)(?:了|下|掉)?.{{0,8}}(?:洗衣液|洗衣凝珠|消毒|电池|磁铁|磁珠|干燥剂|白酒|酒精|香水|蚊香|杀虫)",
                            rf"{_KIN}.{{0,8}}(?:偷吃|偷偷吃|偷喝|拿.{{0,4}}吃)", r"(?:吃|吞)了.{0,4}(?:大人|爷爷|奶奶|外公|外婆|妈妈|爸爸|老人)的.{0,6}药"),
    "drug_alcohol": _any(r"(?:喝|饮)了?.{0,4}酒.{0,12}(?:头孢|甲硝唑|替硝唑)", r"(?:头孢|甲硝唑|替硝唑).{0,12}(?:喝|饮)了?.{0,4}酒"),
    "reaction_signs": _any(r"脸.{0,3}(?:通红|红)", r"心(?:跳|慌)", "胸闷", r"喘", "晕", "难受", "恶心", "吐"),
    "toxic_intake": _any(r"误(?:喝|服|食|吃|吞)", r"误把[^，。,]{1,8}(?:当|喝|吃)", r"(?:甲醇|工业酒精|假酒|防冻液)[^，。,]{0,8}(?:喝|吃)",
                         r"把[^，。,]{1,8}当(?:成|作)?[^，。,]{1,6}(?:喝|吃)(?:了|下)", r"(?:喝|拿)错(?:了)?瓶子", r"喝错(?:了)?(?:药|东西)",
                         r"(?:除草剂|杀虫剂|草甘膦|敌草快|防冻液|稀释剂|香蕉水|灭鼠药|杀虫水|驱虫药).{0,6}(?:喝|吃|吞)(?:了|下|进)?",
                         r"(?:喝|吃|吞)(?:了|下)?.{0,6}(?:除草剂|杀虫剂|草甘膦|敌草快|防冻液|稀释剂|香蕉水|灭鼠药)",
                         r"(?:喝|吃|吞|服)(?:了|下|掉)?.{0,6}(?:农药|敌敌畏|百草枯|乐果|老鼠药|鼠药|消毒液|84|洁厕|漂白|洗洁精|汽油|煤油|烧碱|火碱|硫酸|干燥剂|纽扣电池|毒蘑菇|野蘑菇|甲醇|假酒|水银)",
                         r"(?:农药|敌敌畏|百草枯|老鼠药|鼠药|消毒液|84|洁厕灵?|漂白水|汽油|烧碱|干燥剂|纽扣电池|野蘑菇).{0,8}(?:喝|吃|吞)(?:了|下|进)"),
    "drug_mistaken": _any(r"(?:吃|吞|喝)了.{0,8}(?:药|丸|片|胶囊).{0,2}(?:好多|很多|好几|十几|一大把)(?:粒|颗|片)?",
                          r"(?:84|消毒液|漂白|洁厕).{0,6}(?:和|跟|混).{0,6}(?:84|消毒液|漂白|洁厕|酸)",r"把.{0,10}(?:药|药片|药丸|胶囊|安眠药|降压药|降糖药).{0,3}当(?:成|作)?.{0,4}(?:糖|零食|水|饮料|豆|维生素)",
                           r"(?:药|药片|药丸|胶囊).{0,4}(?:吃|吞|喝)(?:了|下)?(?:好几|十几|二十|几十|一把|一堆)(?:颗|粒|片)",
                           r"(?:吃|吞)(?:了|下)?(?:好几|十几|二十|几十|一把|一堆)(?:颗|粒|片).{0,10}(?:药|安眠|降压|降糖|止痛|退烧)"),
    "toxic_plant": _any("药酒", "野菜", "野果", r"(?:自己|山上|路边|野外|树林里)(?:采|摘|捡)(?:来)?的.{0,4}(?:蘑菇|菌|菜|果|草)", r"不认识的(?:菜|果|草|蘑菇|植物)", "草乌", "川乌", "乌头", "附子", "断肠草", "钩吻", "毒蘑菇", "野蘑菇", "野生菌", "河豚", "发芽.{0,2}土豆", "生豆角", "白果"),
    "toxic_signs": _any(r"呼吸.{0,4}(?:困难|费劲|急)", "胡话", r"(?:嘴|舌头|手脚|全身|浑身).{0,6}(?:发麻|麻木|麻了)", r"心跳.{0,2}(?:乱|不齐|很快|很慢)", "抽", "重影", r"看不清", "昏",
                        r"上吐下泻", "吐得", r"一直吐", "叫不醒"),
    "overdose": _any(r"(?:吃|吞|服|喝)(?:了|下|掉)?.{0,6}(?:(?:一大?把|一整?瓶|一整?盒|一整板|整整一|一堆)(?!种)|(?:十几|几十|[二三四五六七八九十]十多?|好多|很多|大量)(?:片|粒))(?:[^种]{0,10})(?:药|片|丸)",
                     r"(?:吃|吞|服)(?:了|下|掉)?.{0,4}(?:十几|几十|[二三四五六七八九]十多?|一大把|一整板|一整瓶)(?:片|粒)",
                     "服药过量", r"过量服(?:用|药)", "吞药", r"药吃多了", r"吃多了.{0,2}药"),
    "gas": _any("一氧化碳", "煤气中毒", "煤炉", "煤气", "炭火", "烧炭", "燃气", "热水器", "蜂窝煤", "炭盆", "烤火", "炉子", "尾气", "没熄火", r"车库.{0,8}(?:关|发动)"),
    "gas_symptoms": _any(r"(?:一家人|全家|一家[三四五六]口|都)(?:都)?.{0,4}(?:头痛|头疼|头晕|恶心|呕吐)", "站不起来", "晕", r"叫不(?:太|大)?醒",
                         r"门窗.{0,4}(?:关|紧闭)", "恶心", "站不稳", "晕乎乎"),
    "pesticide_exposure": _any(r"打药", r"(?:农药|除草剂|杀虫剂).{0,6}(?:吸|闻|沾|溅)"),
    "cholinergic": _any(r"瞳孔.{0,3}(?:小|缩小|针尖)", "流口水", r"吐", "头晕", "大汗", r"肌肉.{0,2}(?:跳|颤)"),
    "heat": _any("大太阳", "太阳底下", "暴晒", "高温", "闷热", "中暑", "热射病", "桑拿", r"(?:车|屋)里.{0,6}(?:闷|热)"),
    "heat_danger": _any("说胡话", "糊涂", r"叫不(?:太|大)?醒", "昏", "抽", r"(?:滚烫|发烫).{0,6}(?:不出汗|没汗)", "不出汗", "晕倒", "倒下", "前言不搭后语"),
    "hypo_context": _any("胰岛素", "降糖药", "格列", "二甲双胍", r"糖尿病.{0,12}(?:没吃饭|不吃饭|饿|低血糖)", "低血糖"),
    "hypo_signs": _any(r"(?:浑身|全身|手)(?:发抖|哆嗦|打颤)", r"说话.{0,2}含(?:糊|含糊糊)", "满头大汗", "冷汗", "说胡话", "糊涂", "前言不搭后语", r"叫不(?:太|大)?醒", "意识不清", "昏",
                       r"反应.{0,2}(?:迟钝|慢)", r"不认识"),
    "venom": _any(r"被?(?:毒)?蛇咬", "毒蛇", r"蝎子.{0,2}(?:蛰|蜇)", "毒蜘蛛", r"被蛇"),
    "suicide_strong": _any("不想活", r"割(?:了|破)?(?:自己的?)?手腕", r"(?:上吊|跳河)(?:了|自杀)", r"(?:要|想|去|在)(?:上吊|割腕|跳河)", r"再也不会(?:痛|疼|难过|累)的地方", r"去(?:另一个|那边的?)世界", r"(?:怎么|怎样|如何)(?:才能)?(?:死|自杀)", "死不痛苦", "自杀方法", r"(?:站|坐|爬)(?:在|到|上)(?:了)?.{0,3}(?:天台|楼顶|桥上|窗台|阳台外)", r"(?:睡过去|睡着|闭上眼)?.{0,2}(?:不再|再也不|别再|永远不)(?:醒|醒来)", "一睡不醒", "不想醒", "活不下去", "一了百了", "轻生", "自杀", "寻死", r"结束(?:自己的?)?(?:生命|这一切|一切)", "割腕", "跳楼",
                           "遗书", "遗言", r"死了(?:算了|就好了|也好)", "不如死了", "交代后事"),
    "suicide_mood": _any(r"活着.{0,6}(?:没意思|没意义|没什么意义|没劲|太累|好累|痛苦|煎熬|受罪)", "(?<!不)想死", "累赘", r"不想拖累", "解脱",
                         r"(?:熬|撑|挺)不(?:下去|住了|动了)", r"(?:说|觉得)自己.{0,2}没用", r"不想再(?:熬|撑|坚持)", "没有盼头", r"(?:真的|实在)?受够了",
                         r"离开这个世界", "没有活下去的"),
    "farewell": _any(r"说(?:了)?(?:永别|再见)了?", r"再见了?.{0,2}(?:这个)?世界", r"告别.{0,4}(?:这个)?世界", r"(?:东西|心爱的|宝贝).{0,6}(?:都|全)?送(?:人|给|掉)",
                     r"你们?(?:以后)?要好好的", r"交代(?:后事|什么|好了)", r"当(?:作)?(?:没有我|没生过我|没养过我|我(?:已经)?死了)", "永别", r"下辈子(?:再|见)", r"对不起.{0,4}(?:你们|大家|爸妈|爸爸妈妈|所有人)", r"再也不(?:回来|回家)了?", 
                     r"照顾好(?:爸妈|自己|孩子|爸爸妈妈|我妈|我爸)", r"以后.{0,4}不用(?:管|找|担心)我", r"再也见不到", "来世"),
    "suicide_plan": _any(r"(?:跳下去|楼顶)", r"(?:药|绳子|刀|炭)(?:我)?(?:都|已经)?(?:准备|买|攒)好了", r"(?:今晚|今天)(?:就)?要?(?:烧炭|跳|走了)", r"(?:全|都)(?:吃|吞)(?:掉|了|下去)", r"手腕.{0,6}(?:照片|图|刀|割|划)", r"(?:刀片|绳子).{0,6}(?:准备|买|找)",
                         r"(?:电话|微信|消息).{0,3}(?:不接|不回|打不通)", "联系不上", r"(?:密码|存款|银行卡|钥匙).{0,6}(?:告诉|交给|留给)", r"人(?:不见了|找不到了|失联)", r"(?:发现|藏|翻出|找到).{0,10}(?:刀|药|绳子|农药)", r"安眠药.{0,8}(?:准备|攒|存)", r"(?:攒|存|准备)了?.{0,6}(?:安眠药|药|绳子|刀)",
                         r"药都(?:找|翻|拿)出来", r"写好了?.{0,8}(?:信|遗)", r"没人的地方", r"(?:手机|电话).{0,3}关机"),
    "trauma_mechanism": _any("摔下来", r"从.{0,8}(?:楼|高处|梯子|床|树|车|房顶|架子).{0,4}(?:摔|掉|跌|坠)", "车祸", "被车撞", r"(?:骑|开).{0,6}车.{0,4}摔",
                             r"撞到(?:了)?头", r"头.{0,6}(?:撞|磕|着地)", "后脑勺?着地", r"(?:砸|撞|磕)(?:到|了|伤)?.{0,2}(?:头|脑袋|后脑勺)", "坠落",
                             r"(?:头|脑袋|后脑勺).{0,4}(?:被|给).{0,6}(?:砸|撞|打)"),
    "trauma_danger": _any(r"吐", "呕", r"喘不(?:上|过)气", r"呼吸.{0,3}(?:困难|费劲)", r"胸口?.{0,4}(?:疼|痛)得", r"叫不(?:太|大)?醒", r"变形", "迷糊", r"一(?:地|摊)的?血", r"心跳.{0,4}(?:乱|不齐)", r"(?:老|一直)?想睡", "嗜睡", "迷迷糊糊", "昏", "没反应", "叫不醒", r"出血.{0,4}(?:多|不止)", "流了好多血",
                          "不能动", "动不了", "抽", r"(?:肚子|腹).{0,4}(?:胀|疼|痛|硬)", r"脸色(?:苍白|发白|煞白)", "口渴",
                          r"头(?:痛|疼).{0,3}(?:厉害|加重)", r"耳朵.{0,3}(?:流血|流水)", r"眼神.{0,3}(?:发直|呆|不对)", r"(?:腿|胳膊|脖子).{0,4}(?:变形|动不了)"),
    "drowning_burn_shock": _any(r"(?:炸|扎|戳|溅|烧|崩)(?:到|伤|进)了?.{0,3}眼睛?.{0,10}(?:流血|看不见|看不清|睁不开)",
                                r"眼睛.{0,6}(?:进了?|溅了?)(?:石灰|碱|硫酸|盐酸|烧碱|洁厕|消毒液)",r"(?:热油|开水|热水|火|蒸汽).{0,6}(?:泼|浇|烫|烧|溅)(?:到|了|伤)?.{0,8}(?:脸|脖子|胸|眼|全身|大片)",r"(?:澡盆|浴缸|水里|河里|池|塘|水缸|水桶|海里).{0,12}(?:捞|拖|拉|救|抱)(?:起来|上来|出来)", r"被?(?:捅|刺|扎)了?.{0,3}刀", r"被.{0,6}(?:扎|刺|插|戳)(?:穿|透|进)",
                                r"被电(?:打|击|到)",
                                r"(?:烫|烧)(?:伤|起)?.{0,8}(?:大水泡|大泡|皮都(?:掉|脱)|一大片|全身|整个|胸口和|两条)",
                                r"(?:胸口|肚子|后背|全身|两条(?:胳膊|腿)|半个身子).{0,8}(?:都)?(?:烫|烧)(?:伤|起|掉|脱|了)",r"大面积.{0,4}(?:烧伤|烫伤)", r"(?:烧伤|烫伤).{0,6}(?:大面积|一大片|全身)", "触电", r"被电(?:到|击)", "溺水", "淹水",
                                r"呛了?(?:好多|几口)?水.{0,10}(?:捞|救)", r"(?:捞上来|救上来|掉进.{0,4}(?:河|水|池|塘))"),
    "heavy_bleeding": _any(r"一(?:地|摊|大摊|身|脸)的血", r"血流了一(?:地|身|脸)", r"血.{0,4}(?:捂|按|压|堵)(?:都|也)?(?:捂|按|压|堵)?不住",
                           r"(?:弄|浸|湿)(?:透|湿)?了?.{0,2}(?:裤子|床单|被子)",r"(?:湿透|浸透)了?.{0,4}(?:一|几|好几|两|三)?(?:片|张|条|块)?.{0,4}(?:卫生巾|垫子|护垫|床单|裤子)",
                           r"一(?:个)?小时.{0,6}(?:就)?(?:湿透|浸透|换).{0,6}(?:卫生巾|垫)", r"一(?:马桶|盆|便盆|地)(?:都)?(?:是)?(?:血|红)",r"血.{0,6}(?:止不住|喷|往外冒|往外涌|流个不停|流不停|一直流|浸透|湿透)", r"止不住.{0,3}血", "大出血",
                           r"出血.{0,4}(?:止不住|不止|很多|好多|不停)", r"流了(?:很|好|特别)多血", r"(?:纱布|毛巾|衣服).{0,8}(?:浸透|湿透|全是血)",
                           r"(?:浸透|湿透)了?.{0,6}(?:毛巾|纱布|衣服)", r"一(?:大)?摊血", "一地血", r"血.{0,4}(?:哗哗|像水龙头)", "满地都是血",
                           "血流如注"),
    "vomit_blood": _any(r"(?:吐|呕)(?:了|出)?.{0,8}(?:咖啡渣|咖啡色|暗红|鲜红|酱油色)", r"(?:咖啡渣|咖啡色).{0,6}(?:吐|呕)",r"吐了?.{0,4}(?:一大?口|很多|好多|大量|一盆|好几口)?血", "呕血", "咯血", r"咳.{0,3}(?:一大?口|很多|好多|大量)血",
                        r"便血.{0,4}(?:很多|好多|一大|不止)", r"拉.{0,4}(?:很多|好多)血"),
    "nosebleed_long": _any(r"(?:鼻子|鼻孔).{0,2}(?:流|出)血.{0,12}(?:半个?多?小时|一个多?小时|\d+分钟|止不住|不止|没用|一直流|停不下|都不停)", r"鼻血.{0,12}(?:半个?多?小时|\d+分钟|止不住|不止|没用|一直流|停不下)"),
    "melena": _any("黑便", "柏油", "沥青", r"拉(?:了)?.{0,6}血", r"(?:大便|解手).{0,6}(?:全是|都是|好多|很多)?血", r"拉黑色?的?大便", r"(?:大便|便便|拉的|屎).{0,8}(?:黑|像墨)"),
    "melena_shock": _any(r"站起来.{0,3}(?:就)?(?:晕|头晕|发黑)", "脸色发白", "头晕", "晕", r"脸.{0,2}(?:白|黄)", "蜡黄", "心慌", "冰凉", "冷汗", r"眼前.{0,2}发黑", r"差点.{0,2}(?:摔|晕|倒)"),
}


@dataclass(frozen=True)
class Rule:
    category: str
    patterns: tuple[str, ...]  # all must match
    weight: float = 1.0


def _r(category: str, weight: float, *patterns: str) -> Rule:
    """A rule over SIGNS (by name) or raw patterns."""
    return Rule(category, tuple(SIGNS.get(p, p) for p in patterns), weight)


RULES: tuple[Rule, ...] = (
    # stroke: face, arm, speech (FAST), vision and balance; two signs together flag; a thunderclap
    # headache (subarachnoid haemorrhage) alone
    _r("stroke", 0.6, "face_droop"),
    _r("stroke", 0.6, "one_side_weak"),
    _r("stroke", 1.0, rf"{_SIDE}(?:身子|身体).{{0,4}}(?:动不了|不能动|瘫)"),
    _r("stroke", 0.6, "speech"),
    _r("stroke", 0.4, "vision_loss"),
    _r("stroke", 0.4, "imbalance"),
    _r("stroke", 0.3, "imbalance", r"(?:吐|呕|走不了路|走不动路|不能走)"),  # vertigo that vomits and cannot walk
    _r("stroke", 1.0, "thunderclap"),
    # hypertensive emergency: a very high pressure with the brain or eyes complaining
    _r("stroke", 0.6, r"血压.{0,6}(?:1[89]\d|2\d\d)", r"(?:头(?:痛|疼)|吐|呕|看不清|看东西模糊|说话不清|胸闷|糊涂)"),
    _r("stroke", 0.55, _ACUTE, r"(?:中风|脑梗|脑卒中|脑出血|脑溢血)"),  # below ACUITY_FLOOR: its acuity is counted
    # heart attack, aortic dissection, dangerous arrhythmia: chest pain with the company it keeps
    _r("cardiac", 0.6, "chest_pain"),
    _r("cardiac", 0.5, "radiating"),
    _r("cardiac", 0.4, "sweating"),
    # the old, women and diabetics often feel a heart attack as a stomach ache with sweating (with the
    # sweating rule, 0.7: it needs acuity or a second sign of shock)
    _r("cardiac", 0.3, r"(?:胃|上腹|心窝)(?:部)?.{0,4}(?:疼|痛)", r"(?:冷汗|虚汗|大汗|一身汗|满头大汗)"),
    _r("cardiac", 0.4, "chest_pain", "unrelieved"),
    _r("cardiac", 0.3, "shock"),
    _r("cardiac", 0.3, "palpitations"),
    _r("cardiac", 1.0, r"撕裂.{0,4}(?:痛|疼)"),
    _r("cardiac", 0.6, r"(?:背|胸口|胸部|前胸).{0,6}(?:刀割|刀绞|刀扎|撕开|撕扯|裂开).{0,4}(?:疼|痛)"),
    _r("cardiac", 0.6, r"(?:两只手|左右手|两边胳膊|双上肢).{0,6}血压.{0,4}(?:差|不一样)"),
    _r("cardiac", 1.0, r"心(?:跳|率).{0,16}(?:特别快|很快|两百|二百|一百[五六七八九]|一百多|1[5-9]\d|2\d\d|特别慢|很慢|停|擂鼓)",
       r"(?:胸闷|发黑|黑蒙|晕|喘|胸痛|胸口|站不住|站不稳)"),
    _r("cardiac", 0.4, "chest_pain", r"(?:晕过去|晕倒|昏倒|晕厥|昏过去|倒下)"),
    _r("cardiac", 1.0, r"(?:心梗|心肌梗死|心肌梗塞|心脏骤停|心跳骤停)", _ACUTE),
    _r("cardiac", 1.0, r"心绞痛.{0,10}(?:不缓解|不管用|没用|越来越)"),
    # severe bleeding
    _r("bleeding", 1.0, "heavy_bleeding"),
    _r("bleeding", 1.0, "vomit_blood"),
    _r("bleeding", 1.0, "nosebleed_long"),
    _r("bleeding", 1.0, "melena", "melena_shock"),
    # breathing difficulty
    _r("breathing", 0.7, "dyspnea"),
    _r("breathing", 0.3, _ACUTE, "dyspnea"),
    _r("breathing", 0.7, "cyanosis"),
    _r("breathing", 0.4, "orthopnea"),
    _r("breathing", 0.6, "broken_speech"),
    _r("breathing", 0.6, "inhaler_fails"),
    # visible work of breathing: a second sign on top of breathlessness
    _r("breathing", 0.4, r"(?:鼻翼.{0,4}扇|三凹|肋骨.{0,8}(?:坑|凹|陷)|一吸一(?:个)?(?:坑|凹)|哨音|呼哧呼哧|张口呼吸|点头呼吸)"),
    _r("breathing", 0.3, "dyspnea", r"(?:腿|小腿).{0,3}肿"),
    # pink frothy sputum is pulmonary oedema whatever else is said
    _r("breathing", 1.0, r"粉红色?.{0,4}(?:泡沫|痰)"),
    # loss of consciousness, confusion
    _r("unconscious", 1.0, "unresponsive"),
    _r("unconscious", 0.5, "confusion"),
    _r("unconscious", 0.5, "drowsy"),
    _r("unconscious", 0.5, r"(?:浑身|全身|一身)(?:大汗|冷汗|是汗)", r"(?:反应|糖尿病|胰岛素|晕|胡话)"),
    _r("unconscious", 0.5, "collapse"),
    _r("unconscious", 1.0, "heat", "heat_danger"),
    _r("unconscious", 0.5, _FEVER, r"(?:说胡话|糊涂|颠三倒四|不认识|认不出|答不上|迷迷|叫不醒|脖子.{0,3}(?:硬|僵))"),
    _r("unconscious", 1.0, "hypo_context", "hypo_signs"),
    # seizures
    _r("seizure", 0.7, "convulsing"),
    _r("seizure", 0.7, "seizure_signs"),
    _r("seizure", 1.0, "seizure_long"),
    _r("seizure", 0.3, r"咬(?:到|破)了?舌头"),  # a bitten tongue is common without a seizure
    _r("seizure", 0.5, r"癫痫.{0,4}(?:发作|大发作)"),
    # anaphylaxis: an allergen and the airway, breathing or circulation
    _r("anaphylaxis", 1.5, "allergen", "throat_tight"),
    _r("anaphylaxis", 1.5, "allergen", "wheeze"),
    _r("anaphylaxis", 1.5, "allergen", "faint"),
    _r("anaphylaxis", 0.6, "allergen", "face_swelling"),
    _r("anaphylaxis", 0.4, "allergen", r"(?:恶心|想吐|呕吐|吐了|肚子.{0,2}(?:疼|痛)|心里难受|心慌)"),
    _r("anaphylaxis", 1.0, "hives_all_over", "wheeze"),
    _r("anaphylaxis", 1.0, "hives_all_over", "throat_tight"),
    _r("anaphylaxis", 1.0, "hives_all_over", "allergen", r"(?:胸闷|胸口.{0,2}憋|晕|心慌|喘)"),
    _r("anaphylaxis", 0.6, r"(?:打完|打了|输完|输了|注射完?)(?:针|液|疫苗|吊瓶)", r"(?:胸闷|胸口.{0,2}憋|心慌|喘|晕)"),
    # poisoning, overdose, venomous bites
    _r("poisoning", 1.0, "toxic_intake"),
    _r("poisoning", 1.0, "overdose"),
    _r("poisoning", 1.0, r"(?:一氧化碳|煤气中毒)"),
    _r("poisoning", 0.6, "gas"),
    _r("poisoning", 0.5, "gas", "gas_symptoms"),
    _r("poisoning", 1.0, "pesticide_exposure", "cholinergic"),
    _r("poisoning", 1.0, "venom"),
    _r("poisoning", 1.0, "child_ingestion"),
    _r("poisoning", 1.0, "drug_alcohol", "reaction_signs"),
    _r("poisoning", 0.6, "中毒"),
    _r("poisoning", 1.0, r"(?:喝|灌)了.{0,4}(?:一整瓶|一瓶多?|一斤|两斤|半斤|好几瓶|一大瓶).{0,4}(?:白酒|酒)",
       r"(?:叫不(?:太|大)?醒|只会哼|冰凉|发凉|昏|没反应|推不醒|抽)"),
    _r("poisoning", 1.0, r"(?:(?:嗑药|吸毒|冰毒|摇头丸|K粉|k粉|麻古)(?:了|之后|以后|后)|吸了.{0,4}(?:毒|粉))", r"(?:抽|高烧|体温.{0,3}高|叫不醒|胡话|昏|心跳.{0,3}快|吐)"),
    _r("poisoning", 1.0, "drug_mistaken"),
    _r("poisoning", 1.0, "toxic_plant", "toxic_signs"),
    # suicidal intent: words, mood and plans
    _r("suicide", 1.0, "suicide_strong"),
    _r("suicide", 0.6, "suicide_mood"),
    _r("suicide", 0.6, "suicide_plan"),
    _r("suicide", 1.0, "farewell"),
    # obstetric emergencies: pregnancy and a danger sign
    _r("obstetric", 1.0, "pregnant", "pregnancy_danger"),
    _r("obstetric", 1.0, "pregnant", "visual_sparks"),
    _r("obstetric", 1.0, "pregnant", r"(?:脚|腿|脸).{0,3}肿", r"头(?:痛|疼)"),
    # infants: an infant's age with a danger sign; any fever under three months
    _r("infant", 2.0, _INFANT, "infant_danger"),
    _r("infant", 0.6, _INFANT, "infant_listless"),
    _r("infant", 0.6, _INFANT, "infant_unwell"),
    _r("infant", 0.5, _INFANT, "fluid_loss"),  # dehydration: with a dry mouth, no urine or tears
    _r("infant", 2.0, _YOUNG_INFANT, _FEVER),
    # choking / airway foreign body
    _r("choking", 1.5, "choke_object", "airway_distress"),
    _r("choking", 1.5, r"(?:吃|嚼|含|喝)(?:东西|饭|着|奶)?.{0,8}(?:时候|时|中)?.{0,4}(?:突然|一下子)(?:就)?(?:一直)?(?:咳|呛)", "airway_distress"),
    _r("choking", 1.5, _ACUTE, r"(?:哭不出|说不出话|发不出声|咳不出)", r"(?:憋|脸.{0,3}(?:通红|发紫|发青)|喘不)"),
    # major trauma, burns, drowning, electric shock
    _r("trauma", 1.0, "trauma_mechanism", "trauma_danger"),
    _r("trauma", 1.0, "drowning_burn_shock"),
    _r("trauma", 1.0, r"(?:从|在).{0,8}(?:楼|脚手架|高处|房顶|屋顶|树上|梯子).{0,4}(?:掉|摔|跌|坠)(?:下来|下去)", r"(?:几|[二三四五六七八九]|\d+)楼"),
)

# A negation just before a sign, in the same clause, cancels it ("没有胸痛", "不是突然的"); idioms that
# begin with a negation word but deny nothing do not.
_NEGATION = re.compile(r"(没有|并没|没|无|未|不是|并非|否认|从没|不会|不再)")
_NOT_NEGATION = re.compile(r"(没想到|没多久|没一会|没过多久|无缘无故|没什么原因|没来由|无故|未知|没(几|两)(分钟|天))")
_CLAUSE_END = re.compile(r"[，。！？；,.!?;\n、 ]")
NEGATION_WINDOW = 5  # characters before a sign searched for a negation

# A question about treatment or hospitals for a known, chronic condition that narrates past episodes
# (epilepsy questions often describe their seizures) is not an emergency unless it says it is
# happening now: such texts count half.
_INQUIRY = re.compile(r"(怎么|如何|护理|处理|吗|呢|？|\?|哪家|哪个医院|哪里.{0,3}(治|看)|医院.{0,3}(好|哪)|怎么(治|医治|调理|预防|办理)|如何(治|医治|调理|预防)|治疗(方法|效果)|能(治好|治愈|根治)|偏方|吃什么药|什么药|用药|注意(什么|哪些|事项)|预防|传染|遗传|原因|症状有哪些|属于|能不能|是不是|算不算|有没有|是什么|哪些|怎么回事)")
_CHRONIC = re.compile(r"(病史|复发|小时候|曾经|后来(没事|好了)|过一次|发作时|发病时|病发时|每次|以前|上次|之前|前几天|前些天|前段时间|年前|个月前|多年|确诊|诊断|检查(出|后|完)|医生说|得了|患有?|患上|(带|送)(他|她|孩子)?(到|去|进)了?医院|住院|去医院)")
_NOW = re.compile(r"(现在(?!已|一直在|还在住院|即将|病情|会|能|可以|要不要|需要|应该|怎么|该|还能)|正在|刚才|刚刚|还在(?!住院|医院)|还没停|还不醒|叫不醒|到现在)")
CHRONIC_DAMPING = 0.5
# "What should I do if...", "how to prevent...": signs in a sentence that supposes them are not
# happening. ("会不会是中风？" after a description is a worried relative, not a hypothesis.)
_HYPOTHETICAL = re.compile(r"(区别|说不定|哪一?天|如果|假如|万一|要是|一旦|防止|预防|避免|以防)")
HYPOTHETICAL_DAMPING = 0.4
# Acuity lifts a category that has a worrying sign (score >= ACUITY_FLOOR) by ACUITY_BONUS.
ACUITY_BONUS, ACUITY_FLOOR, ACUITY_REACH = 0.4, 0.6, 15
_SENTENCE_END = re.compile(r"[。！？!?；;\n]")
# A story told in the past ("昨天", "有一次", "后来去医院") or a habit ("经常", "每次") gets no acuity
# bonus: its "突然" is over, or recurs.
# Words that say it is still going on now, whatever happened before.
_STILL = re.compile(r"(正在|刚才|刚刚|还在(?!住院|医院)|还没停|还不醒|叫不醒|到现在|现在(?:还|又|一直|突然|开始|怎么))")
_PAST = re.compile(r"(经常|常常|每次|有时候?|时不时|偶尔|总是|老是|昨天|昨晚|前天|前两天|前几天|前些天|前段时间|上周|上个?月|去年|年前|那次|有一次|有次|那天|当时|后来|以前|之前|小时候|曾经)")
_ACUITY = re.compile(ACUITY)

# Signs of a body failing, whatever the cause: two of them lift every category that has a sign.
SYSTEMIC = tuple(re.compile(p) for p in (
    r"(?:脸|脸色|嘴唇|面色)(?:都|也|全)?(?:煞白|苍白|发白|惨白|白得|白了|发灰|灰灰|蜡黄)",
    r"(?:冷汗|虚汗|凉汗|大汗|一身汗|满头大汗|浑身是汗)",
    r"(?:手脚|四肢|手|身上)(?:都)?(?:冰凉|发凉|冰冷|凉凉|冰)",
    r"(?:嘴唇|口唇|指甲|脸)(?:都|也|有点)?.{0,3}(?:发紫|青紫|发绀|发乌|发青)",
    r"(?:站不住|站不稳|站不起来|瘫|倒在|晕倒|昏倒|差点晕|眼前发黑|快晕)",
    r"(?:迷迷糊糊|迷糊|说胡话|叫不醒|反应.{0,2}(?:迟钝|慢)|没精神|蔫)",
    r"(?:摸不到脉|脉搏.{0,2}(?:弱|摸不到)|血压.{0,3}(?:很低|低到|测不到|掉))",
    r"(?:疼|痛)得(?:在床上|在地上)?(?:打滚|直不起腰|受不了|说不出话|满头大汗|直叫|喊)",
))
SYSTEMIC_BONUS = 0.4

_COMPILED = [(rule, [re.compile(p) for p in rule.patterns]) for rule in RULES]
_HALF = str.maketrans({chr(c): chr(c - 0xFEE0) for c in range(0xFF10, 0xFF1A)} | {"．": "."})


@dataclass(frozen=True)
class Assessment:
    """The safety verdict on a question: ``notice`` is shown before the answer when ``emergency``."""

    emergency: bool
    category: str | None = None
    category_name: str | None = None
    score: float = 0.0
    evidence: tuple[str, ...] = field(default_factory=tuple)
    notice: str | None = None


def _negated(text: str, start: int) -> bool:
    before = text[max(0, start - NEGATION_WINDOW):start]
    before = _CLAUSE_END.split(before)[-1]  # the same clause only
    return bool(_NEGATION.search(_NOT_NEGATION.sub("", before)))


def _find(pattern: re.Pattern, text: str) -> re.Match | None:
    """The first match of ``pattern`` not negated in its clause."""
    for m in pattern.finditer(text):
        if not _negated(text, m.start()):
            return m
    return None


def _acute_near(text: str, spans: list[tuple[int, int]]) -> bool:
    """An acuity word within ACUITY_REACH characters of a sign: "突然" in the same story, not in the history
    told three sentences earlier."""
    for start, end in spans:
        before = _SENTENCE_END.split(text[max(0, start - ACUITY_REACH):start])[-1]
        after = _SENTENCE_END.split(text[end:end + ACUITY_REACH])[0]
        if _find(_ACUITY, before + text[start:end] + after) is not None:
            return True
    return False


def _sentence(text: str, start: int, end: int) -> str:
    """The sentence around ``text[start:end]``."""
    head = _SENTENCE_END.split(text[:start])[-1]
    tail = _SENTENCE_END.split(text[end:])[0]
    return head + text[start:end] + tail


def _patient_text(question: str, history: Sequence[dict] | None, turns: int) -> str:
    recent = [m.get("content", "") for m in (history or []) if m.get("role") == "user"][-turns:]
    return "\n".join([*recent, question]).translate(_HALF)


def assess(question: str, history: Sequence[dict] | None = None, *, history_turns: int = 3) -> Assessment:
    """Red-flag check of ``question`` plus the last ``history_turns`` user turns of ``history``."""
    text = _patient_text(question, history, history_turns)
    scores: dict[str, float] = {}
    evidence: dict[str, list[re.Match]] = {}
    for rule, patterns in _COMPILED:
        found = []
        for p in patterns:
            hit = _find(p, text)
            if hit is None:
                break
            found.append(hit)
        else:
            scores[rule.category] = scores.get(rule.category, 0.0) + rule.weight
            evidence.setdefault(rule.category, []).extend(found)
    if sum(_find(p, text) is not None for p in SYSTEMIC) >= 2:
        scores = {c: s + SYSTEMIC_BONUS if s > 0 else s for c, s in scores.items()}
    past = _PAST.search(text) and not _STILL.search(text)
    for c, s in scores.items():
        if s >= ACUITY_FLOOR and not past and _acute_near(text, [m.span() for m in evidence[c]]):
            scores[c] = s + ACUITY_BONUS
    if _INQUIRY.search(text) and _CHRONIC.search(text) and not _NOW.search(text):
        scores = {c: s * CHRONIC_DAMPING for c, s in scores.items()}
    for c, s in scores.items():
        # suicidal words are never hypothetical enough to ignore
        if c != "suicide" and all(_HYPOTHETICAL.search(_sentence(text, *m.span())) for m in evidence[c]):
            scores[c] = s * HYPOTHETICAL_DAMPING
    flagged = {c: s for c, s in scores.items() if s >= 1.0}
    if not flagged:
        return Assessment(False, score=max(scores.values(), default=0.0))
    category = min(flagged, key=PRECEDENCE.index)
    return Assessment(True, category, CATEGORY_NAMES[category], flagged[category],
                      tuple(dict.fromkeys(m.group(0) for m in evidence[category])), EMERGENCY_NOTICE)


def flag_rate(questions: Iterable[str]) -> tuple[float, list[tuple[str, Assessment]]]:
    """Share of ``questions`` flagged, and the flagged ones (for reports)."""
    total, flagged = 0, []
    for q in questions:
        total += 1
        a = assess(q)
        if a.emergency:
            flagged.append((q, a))
    return (len(flagged) / total if total else 0.0), flagged
